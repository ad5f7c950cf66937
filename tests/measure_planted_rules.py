"""Puts back, one at a time, each training rule the project had before issue 30 and replays the official trajectories
(tests/test_official_trajectory.py) with it: every one must fail the replay's check. Kept out of the suite for its
cost (a replay each); run it after changing the bounds or the fixture:

    TORCH_EXTENSIONS_DIR=/tmp/ext python tests/measure_planted_rules.py

Output of 2026-12-06 (this CPU, loaded), worst gap against the official run, floor in brackets:
    cmae warmup_end         loss 3.8e-02 (2.2e-06), weights 2.4e-01: caught
    cmae bn_weights_exempt  projector.bn0.weight 2.1e-04 (1.6e-07): caught
    cmae momentum_index     loss 1.6e-04 (2.2e-06), target weights 5.1e-02 (6.6e-06): caught
    mae  warmup_end         loss 1.7e-02 (2.2e-07): caught
"""

import math
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_official_trajectory import check  # noqa: E402
from trajectory_helpers import load_fixture, replay  # noqa: E402


def old_lr_at(step, *, base_lr, total_steps, warmup_steps, warmup_start_factor=1e-4, min_lr=0.0):
    """The former warm-up: the peak at T_w instead of T_w - 1."""
    if step < warmup_steps:
        return base_lr * (warmup_start_factor + (1 - warmup_start_factor) * step / warmup_steps)
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def plant(rule: str, mp: pytest.MonkeyPatch) -> tuple:
    import cmae_ds.engine.schedules as schedules
    import cmae_ds.tasks.pretrain as pretrain

    if rule == 'warmup_end':
        mp.setattr(schedules, 'lr_at', old_lr_at)
    elif rule == 'momentum_index':
        read = pretrain.PretrainTask.momentum
        mp.setattr(pretrain.PretrainTask, 'momentum', lambda self, step: read(self, step + 1))
    elif rule == 'bn_weights_exempt':
        return ('train.no_decay=one_dim',)
    return ()


def main() -> int:
    cases = [('cmae', 'warmup_end'), ('cmae', 'bn_weights_exempt'), ('cmae', 'momentum_index'), ('mae', 'warmup_end')]
    missed = 0
    for mode, rule in cases:
        fx, mp = load_fixture(mode), pytest.MonkeyPatch()
        with tempfile.TemporaryDirectory() as tmp:
            rep = replay(fx, Path(tmp), mp, extra=plant(rule, mp))
        mp.undo()
        found = check(rep, fx)
        missed += not found
        print(f'{mode} {rule}: {found or "NOT CAUGHT"}', flush=True)
    return 1 if missed else 0


if __name__ == '__main__':
    sys.exit(main())
