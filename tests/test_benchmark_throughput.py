"""The benchmark's throughput arithmetic (cmae_ds/tasks/benchmark.py) on the real step: debug CMAE on the real
DeepSpeed engine (one rank, gloo, in this process), accumulation 2, with a simulated host clock that advances by
set amounts in each forward, optimizer step and momentum update, so that images/s and MFU can be computed by hand."""

import pytest
from torch.optim.optimizer import register_optimizer_step_pre_hook

from cmae_ds.config import load_config
from cmae_ds.engine.dist import setup_distributed
from cmae_ds.models import CMAE
from cmae_ds.tasks import benchmark
from cmae_ds.tasks.flops import flops_per_image

from run_recorder import one_rank_group


class SimulatedClock:
    def __init__(self):
        self.now, self.forwards = 100.0, 0

    def __call__(self) -> float:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += ms / 1000


@pytest.fixture
def clock(monkeypatch):
    """Forward i (from 0) costs 10 + i^2 ms (steps of unequal length: their median is not their mean), an optimizer
    step 5 ms, a momentum update 3 ms; the real work runs."""
    sim = SimulatedClock()
    forward, update = CMAE.forward, CMAE.momentum_update

    def timed_forward(self, *args, **kwargs):
        sim.advance_ms(10 + sim.forwards**2)
        sim.forwards += 1
        return forward(self, *args, **kwargs)

    def timed_update(self, *args, **kwargs):
        sim.advance_ms(3)
        return update(self, *args, **kwargs)

    monkeypatch.setattr(benchmark, 'clock', sim)
    monkeypatch.setattr(CMAE, 'forward', timed_forward)
    monkeypatch.setattr(CMAE, 'momentum_update', timed_update)
    handle = register_optimizer_step_pre_hook(lambda *_: sim.advance_ms(5))
    yield sim
    handle.remove()


def test_images_per_s_and_mfu_come_from_whole_optimizer_steps(clock):
    cfg = load_config(None, ['model.size=debug', 'model.img_size=32', 'model.patch_size=8', 'model.decoder_depth=1'])
    ds = {
        'train_micro_batch_size_per_gpu': 4,
        'gradient_accumulation_steps': 2,
        'zero_optimization': {'stage': 0},
        'steps_per_print': 10**9,
    }
    with one_rank_group():
        result = benchmark.run_cell('model', cfg, ds, 'ds.json', setup_distributed(), 1, 3, peak_override=0.5)
    assert result.error is None and clock.forwards == 8  # 1 + 3 optimizer steps of 2 micro-steps
    # timed steps: forwards 2-3, 4-5, 6-7, each step with one optimizer step (5 ms) and one momentum update (3 ms)
    steps_ms = [14 + 19 + 8, 26 + 35 + 8, 46 + 59 + 8]
    images_per_s = 3 * 4 * 2 / (sum(steps_ms) / 1000)  # 24 images in 223 ms
    assert result.images_per_s_per_device == pytest.approx(images_per_s, rel=1e-9)
    assert result.images_per_s_per_device == pytest.approx(107.6233184, rel=1e-9)
    assert result.images_per_s_total == pytest.approx(images_per_s, rel=1e-9)
    assert (result.step_ms_median, result.step_ms_p90) == pytest.approx((69, 113), rel=1e-9)
    flop = flops_per_image(cfg.model)['total']
    assert result.gflop_per_image == pytest.approx(flop / 1e9)
    assert result.tflops_per_device == pytest.approx(images_per_s * flop / 1e12, rel=1e-9)
    assert result.mfu == pytest.approx(images_per_s * flop / 0.5e12, rel=1e-9)
    assert result.data_wait_fraction == 0.0  # synthetic batches on the device: no simulated time in the loader
