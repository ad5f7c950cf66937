"""Trains as the official code trains (issue 30): 20 steps of CMAE and of the MAE baseline made by the official
code's own mmengine Runner (tests/fixtures/official_trajectory/make_official_trajectory.py: the config's
paramwise_cfg, LinearLR + CosineAnnealingLR by iteration, the repository's MomentumUpdateHook with a moving
momentum), replayed through cmae_ds.tasks.pretrain.train with the real DeepSpeed engine (ds_configs/cpu_debug.json).

Bounds: BOUND x the distance between two official runs from starts one ulp apart (stored in the fixture, measured by
the script), per step for the losses and per tensor for the final weights and Adam's moments. Tensors whose gradient
is zero but for rounding are left out (their floor is of order 1). The lr of every step and the momentum of every
EMA are compared to the values the official hooks set, to 1e-12 relative."""

import pytest
from trajectory_helpers import CALM, global_gap, load_fixture, loss_gap, loss_gaps, replay, tensor_gaps

BOUND = 10  # x the official noise floor
FLOOR_MIN = 1e-6  # a tensor that both runs ended at the same value still has to pass at fp32 rounding


def check(rep, fx, bound=BOUND, floor_min=FLOOR_MIN, parts=('final', 'exp_avg', 'exp_avg_sq')):
    """(what failed, or '') with the worst ratios, so that a failure names the tensor and the rule it points to."""
    problems = []
    gap = loss_gap(rep, fx)
    if gap > bound * max(fx['noise_floor']['loss'], floor_min):
        problems.append(f'per-step loss {gap:.1e} > {bound} x floor {fx["noise_floor"]["loss"]:.1e}')
    for part in parts:
        gaps = tensor_gaps(getattr(rep, part), fx, part)
        bad = {k: v for k, v in gaps.items() if v[0] > bound * max(v[1], floor_min)}
        if bad:
            worst = sorted(bad.items(), key=lambda kv: -kv[1][0])[:3]
            problems.append(
                f'{part}: {len(bad)} of {len(gaps)} tensors, worst '
                + ', '.join(f'{k} {d:.1e} (floor {f:.1e})' for k, (d, f) in worst)
            )
    return '; '.join(problems)


def check_schedules(rep, fx):
    assert len(rep.lrs) == len(fx['lr'])
    for k, (groups, want) in enumerate(zip(rep.lrs, fx['lr'])):
        assert groups == pytest.approx([want] * len(groups), rel=1e-12), (k, groups, want)
    if fx['momentum'] is not None:
        assert rep.momenta == pytest.approx(fx['momentum'], rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['cmae', 'mae'])
def test_replays_the_official_trajectory(mode, tmp_path, monkeypatch):
    """Measured 2026-12-06 (this CPU, loaded): CMAE within 1.9x the floor (loss 2.5e-6 against 2.2e-6), MAE within
    1.3x. Planted back one at a time, each official rule fails it by orders of magnitude: the warm-up peaking at T_w
    (loss 3.8e-2), the BatchNorm weights exempt from decay (projector.bn0.weight 2.1e-4 against a floor of 1.6e-7),
    the momentum read at step k + 1 (the target's weights 5.1e-2 against 6.6e-6): tests/measure_planted_rules.py."""
    fx = load_fixture(mode)
    rep = replay(fx, tmp_path, monkeypatch)
    check_schedules(rep, fx)
    assert not check(rep, fx)


# bf16 on our side against the official fp32, measured 2026-12-06 on this CPU (DeepSpeed bf16, ZeRO-0, the fixture's
# 20 steps): CMAE weights 1.9e-3 (every calm tensor end to end), per-step loss worst 2.1e-2, mean 5.8e-3; MAE 1.3e-3,
# 8.6e-3, 3.1e-3. The bounds are twice those (docs/spec.md section 8).
BF16 = {'cmae': dict(weights=4e-3, worst=4e-2, mean=1.2e-2), 'mae': dict(weights=3e-3, worst=2e-2, mean=6e-3)}


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['cmae', 'mae'])
def test_bf16_stays_within_the_stated_bound_of_official_fp32(mode, tmp_path, monkeypatch):
    fx = load_fixture(mode)
    rep = replay(fx, tmp_path, monkeypatch, precision='bf16')
    check_schedules(rep, fx)
    gaps, bound = loss_gaps(rep, fx), BF16[mode]
    assert global_gap(rep.final, fx) < bound['weights']
    assert max(gaps) < bound['worst'] and sum(gaps) / len(gaps) < bound['mean'], gaps


def test_the_fixture_was_made_with_a_calm_majority():
    """Most tensors carry information: if the official run were chaotic, the bounds would hold nothing."""
    for mode in ('cmae', 'mae'):
        fx = load_fixture(mode)
        floors = fx['noise_floor']['final']
        calm = [k for k, v in floors.items() if v < CALM]
        assert len(calm) > 0.8 * len(floors), (mode, len(calm), len(floors))
        assert fx['noise_floor']['loss'] < 1e-4
