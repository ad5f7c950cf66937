"""The rollback guard judges a step one step late (cmae_ds/engine/guards/agreement.py) unless the step is logged or
saved: a poisoned image and a loss spike on steps that are neither are still rolled back to the same checkpoints,
with the same data skipped, and the run ends with the same weights as one that judges every step at once (logged
every step). Real launch/pretrain.py runs, as tests/test_rollback.py."""

import pytest
import torch
from test_engine import assert_same_weights, final_state
from test_rollback import events, folder, run  # noqa: F401 (folder: the fixture of real JPEGs)

from engine_helpers import tail

pytestmark = [pytest.mark.slow]


def test_a_step_judged_late_rolls_back_as_one_judged_at_once(tmp_path, folder):  # noqa: F811
    late = run(tmp_path, 'late', folder, 'train.max_steps=8', 'train.log_every_steps=1000')
    assert late.returncode == 0, tail(late)
    nan, spike = events(tmp_path, 'late')
    assert (nan['step'], nan['reason'], nan['checkpoint'], nan['skipped']) == (
        3,
        'non-finite loss',
        'step_00000002',
        [[0, 8, 12]],
    )
    assert (spike['step'], spike['checkpoint'], spike['skipped']) == (5, 'step_00000004', [[1, 4, 8]])
    at_once = run(tmp_path, 'at_once', folder, 'train.max_steps=8')
    assert at_once.returncode == 0, tail(at_once)
    state = final_state(tmp_path, 'late')
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert_same_weights(state, final_state(tmp_path, 'at_once'))
