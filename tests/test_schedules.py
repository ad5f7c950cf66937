"""lr and momentum schedules: values at the landmarks, shape between them, edge cases."""

import math

import pytest

from cmae_ds.engine.schedules import lr_at, momentum_at, scaled_lr

LR = 2.4e-3


def lr(step, total=1000, warmup=100, **kw):
    return lr_at(step, base_lr=LR, total_steps=total, warmup_steps=warmup, **kw)


def test_scaled_lr_official_recipe():
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert scaled_lr(1.5e-4, 256) == pytest.approx(1.5e-4)
    with pytest.raises(ValueError):
        scaled_lr(1.5e-4, 0)


def test_warmup_starts_at_start_factor_and_is_linear():
    assert lr(0) == pytest.approx(1e-4 * LR)
    assert lr(50) == pytest.approx(LR * (1e-4 + (1 - 1e-4) * 50 / 99))
    steps = [lr(s) for s in range(100)]
    diffs = [b - a for a, b in zip(steps, steps[1:])]
    assert all(d == pytest.approx(diffs[0]) for d in diffs)


def test_peak_at_last_warmup_step_then_cosine_to_min():
    assert lr(99) == pytest.approx(LR)
    assert lr(100) == pytest.approx(LR)
    assert lr(550) == pytest.approx(LR / 2)  # half-way through the decay
    assert lr(1000) == pytest.approx(0.0, abs=1e-15)
    assert lr(1000, min_lr=1e-6) == pytest.approx(1e-6)
    assert lr(550, min_lr=1e-6) == pytest.approx(1e-6 + (LR - 1e-6) / 2)
    # Cosine in between: independent formula.
    s = 700
    assert lr(s) == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * (s - 100) / 900)))


def test_monotone_up_then_down():
    values = [lr(s) for s in range(1001)]
    assert all(a < b for a, b in zip(values[:99], values[1:100]))
    assert all(a >= b for a, b in zip(values[99:], values[100:]))


def test_no_warmup_starts_at_peak():
    assert lr(0, warmup=0) == pytest.approx(LR)
    assert lr(500, warmup=0) == pytest.approx(LR / 2)


def test_beyond_total_stays_at_min():
    assert lr(1001, min_lr=1e-6) == pytest.approx(1e-6)
    assert lr(10**6, min_lr=1e-6) == pytest.approx(1e-6)


def test_warmup_as_long_as_training_holds_peak():
    assert lr(50, total=100, warmup=100) == pytest.approx(LR * (1e-4 + (1 - 1e-4) * 50 / 99))
    assert lr(100, total=100, warmup=100) == pytest.approx(LR)
    assert lr(150, total=100, warmup=200) == pytest.approx(LR * (1e-4 + (1 - 1e-4) * 150 / 199))


@pytest.mark.parametrize('kw', [dict(step=-1), dict(total=0), dict(warmup=-1)])
def test_bad_arguments(kw):
    args = dict(step=0, total=10, warmup=1)
    args.update(kw)
    with pytest.raises(ValueError):
        lr(args['step'], total=args['total'], warmup=args['warmup'])


# Made by mmengine's own schedulers (mmengine 0.10.x, /work/offbench/mm_pkgs): an SGD optimizer with lr=base, then
# LinearLR.build_iter_from_epoch(start_factor=sf, begin=0, end=warmup, epoch_length=1) and
# CosineAnnealingLR.build_iter_from_epoch(T_max=total - warmup, eta_min=min_lr, begin=warmup, end=total,
# epoch_length=1), recording param_groups[0]['lr'] before each optimizer.step() / s1.step() / s2.step(), as the
# Runner's ParamSchedulerHook steps them after each iteration. Printed with repr() and pasted here.
# (base, start_factor, warmup, total, min_lr) -> lr at steps 0 .. total - 1
# fmt: off
MMENGINE_LR = {
    (1.0, 1e-4, 1, 6, 0.0): [
        0.0001, 0.0001, 9.045084971874738e-05, 6.545084971874737e-05, 3.454915028125263e-05, 9.549150281252631e-06,
    ],
    (1.0, 1e-4, 2, 6, 0.0): [0.0001, 1.0, 1.0, 0.8535533905932737, 0.5, 0.14644660940672627],
    (1.0, 1e-4, 3, 4, 0.0): [0.0001, 0.50005, 1.0, 1.0],
    (1.0, 1e-4, 5, 20, 0.0): [
        0.0001, 0.250075, 0.50005, 0.7500249999999999, 1.0, 1.0, 0.9890738003669028, 0.9567727288213004,
        0.9045084971874737, 0.8345653031794291, 0.75, 0.6545084971874737, 0.5522642316338268, 0.44773576836617335,
        0.34549150281252633, 0.2500000000000001, 0.16543469682057105, 0.09549150281252632, 0.043227271178699504,
        0.010926199633097156,
    ],
    (2.0, 0.01, 4, 10, 0.1): [
        0.02, 0.68, 1.34, 2.0000000000000004, 2.0000000000000004, 1.8727241335952174, 1.5250000000000006,
        1.0500000000000003, 0.5750000000000004, 0.22727586640478328,
    ],
}
# fmt: on


@pytest.mark.parametrize('case', sorted(MMENGINE_LR), ids=lambda c: f'warmup{c[2]}_total{c[3]}')
def test_lr_equals_mmengine_linear_then_cosine(case):
    base, sf, warmup, total, min_lr = case
    ours = [
        lr_at(s, base_lr=base, total_steps=total, warmup_steps=warmup, warmup_start_factor=sf, min_lr=min_lr)
        for s in range(total)
    ]
    assert ours == pytest.approx(MMENGINE_LR[case], rel=1e-12, abs=0)


def test_momentum_official_is_constant():
    for s in (0, 10, 500, 1000, 5000):
        assert momentum_at(s, total_steps=1000, m_base=0.996, m_end=0.996) == pytest.approx(0.996)


def test_momentum_cosine_from_base_to_end():
    m = lambda s: momentum_at(s, total_steps=1000, m_base=0.99, m_end=1.0)  # noqa: E731
    assert m(0) == pytest.approx(0.99)
    assert m(500) == pytest.approx(0.995)
    assert m(1000) == pytest.approx(1.0)
    assert m(2000) == pytest.approx(1.0)  # clamped past the end
    assert m(250) == pytest.approx(1.0 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    values = [m(s) for s in range(1001)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError):
        momentum_at(-1, total_steps=10, m_base=0.99, m_end=1.0)
