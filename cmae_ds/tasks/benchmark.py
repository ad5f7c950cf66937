"""Throughput benchmark: the real training step (or the data pipeline alone) timed without per-step host syncs.

Modes: 'model' (synthetic batches already on the device), 'data' (the pipeline alone), 'e2e' (the real step fed by
the real pipeline). Step times come from device events on a GPU (one synchronize at the end) and from the host
clock on a CPU, where execution is synchronous anyway.

The unit timed in 'model' and 'e2e' is the whole optimizer step: every micro-step of its gradient accumulation and
the target's momentum update. images/s is the images of the timed steps over their summed time, and MFU follows
from it; a median over micro-steps would leave out the ones that carry the optimizer step and the momentum update
(at accumulation 4 it is a bare forward-backward) and overstate both. In 'data' the unit is one micro-batch.

`guards`: 'on' runs the rollback guard and the stop agreement at every step as a run has them (engine.guards: the
step's values judged a step late, one collective with the stop flag); 'immediate' judges each step at once and
agrees on the stop in a collective of its own (the step before issue 33); 'off' times the bare step.
`ema`: 'auto' the run's EMA (from the fp32 master where DeepSpeed keeps one on the device); 'bf16' the update from the
model's weights (the foreach path before issue 33).
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..config import Config
from ..config.ds_config import ResolvedBatch, check_precision_supported, compute_dtype, validate
from ..engine import torch_globals
from ..engine.dist import DistContext
from ..engine.schedules import scaled_lr
from ..kernels import last_impl
from .flops import flops_per_image, mfu, peak_tflops
from .pretrain import mask_generator, momentum_step, pretrain_loader, train_step

clock = time.perf_counter  # the host clock of every CPU timing here (a test puts a simulated one in its place)


@dataclass
class BenchResult:
    mode: str  # images_per_s_*: images over the summed time of whole optimizer steps (one micro-batch in 'data')
    size: str
    model_mode: str
    ds_config: str
    micro_batch: int
    world_size: int
    precision: str
    zero_stage: int
    device: str
    images_per_s_per_device: float = 0.0
    images_per_s_total: float = 0.0
    step_ms_median: float = 0.0
    step_ms_p90: float = 0.0
    tflops_per_device: Optional[float] = None
    mfu: Optional[float] = None
    gflop_per_image: Optional[float] = None
    peak_mem_gib: Optional[float] = None
    data_wait_fraction: Optional[float] = None
    attention: Optional[str] = None
    optimizer: Optional[str] = None
    error: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class StepTimer:
    """Per-step durations: CUDA events recorded in the stream, read after one synchronize at the end."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == 'cuda'
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(clock())

    def durations_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1000 for a, b in zip(self.marks, self.marks[1:])]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _peak_mem_gib(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _synthetic_batch(cfg: Config, batch_cfg: ResolvedBatch, device) -> dict:
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    s = cfg.model.img_size
    shape = (batch_cfg.micro_batch, 3, s, s)
    return {
        'img': torch.randn(shape, generator=gen, device=device),
        'img_target': torch.randn(shape, generator=gen, device=device),
    }


def _batches(mode: str, cfg: Config, batch_cfg: ResolvedBatch, ctx: DistContext):
    """An endless iterator of micro-batches and the name of what produces them."""
    if mode == 'model':
        batch = _synthetic_batch(cfg, batch_cfg, ctx.device)
        return iter(lambda: batch, None), 'synthetic-on-device'
    loader = pretrain_loader(cfg, batch_cfg, ctx)

    def endless():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    return endless(), loader.name


def run_cell(
    mode: str,
    cfg: Config,
    ds: dict,
    ds_name: str,
    ctx: DistContext,
    warmup: int,
    steps: int,
    peak_override: Optional[float] = None,
    guards: str = 'on',
    ema: str = 'auto',
) -> BenchResult:
    """Benchmark one (model size, DeepSpeed config, micro-batch) cell. Collective under a launcher."""
    batch_cfg = validate(ds, cfg, ctx.world_size, path=ds_name)
    check_precision_supported(batch_cfg, ds_name)
    result = BenchResult(
        mode,
        cfg.model.size,
        cfg.model.mode,
        ds_name,
        batch_cfg.micro_batch,
        ctx.world_size,
        batch_cfg.precision,
        batch_cfg.zero_stage,
        str(ctx.device),
    )
    if ctx.device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(ctx.device)
    batches, source = _batches(mode, cfg, batch_cfg, ctx)
    result.extra['data'] = source
    if mode == 'data':
        times, wait = _time_data(batches, warmup, steps, ctx.device)
    else:
        result.extra.update(guards=guards, ema=ema)
        with torch_globals.restored():  # a ZeRO-3 cell's linear must not time the cells after it
            times, wait = _time_steps(cfg, ds, batch_cfg, ctx, batches, warmup, steps, result, guards, ema)
    _fill(result, cfg, batch_cfg, ctx, times, wait, peak_override)
    return result


def _time_data(batches, warmup: int, steps: int, device) -> tuple[list[float], float]:
    timer = StepTimer(device)
    for _ in range(warmup):
        next(batches)
    timer.mark()
    for _ in range(steps):
        next(batches)
        timer.mark()
    return timer.durations_ms(), 1.0


class Guards:
    """The rollback guard and the stop requests of a run (engine.guards), fed the benchmark's steps; nothing is
    written (no checkpoint: a verdict is only counted)."""

    def __init__(self, cfg, batch_cfg, ctx, engine, immediate: bool):
        import tempfile
        from types import SimpleNamespace

        from ..engine.guards.preemption import StopRequests
        from ..engine.guards.rollback import RollbackGuard
        from ..engine.guards.skips import Layout
        from ..engine.loop import Progress

        self.tmp = tempfile.TemporaryDirectory()
        self.stop = StopRequests()
        self.stop.attach(ctx.world_size)
        tmp = Path(self.tmp.name)
        start = SimpleNamespace(ctx=ctx, stop=self.stop, run_dir=tmp, ckpt_dir=tmp, tag=None)  # a fresh run
        layout = Layout(batch_cfg.global_batch, 10**9)
        self.guard = RollbackGuard(cfg.train, start, engine, Progress(), layout, batch_cfg.grad_accum, None)
        self.immediate, self.events = immediate, 0

    def after_micro_step(self, out: dict) -> None:
        self.guard.accumulate(out)

    def after_step(self, step: int) -> None:
        self.events += self.guard.check(step, now=self.immediate) is not None
        if self.immediate:
            self.stop._decided = None  # the stop agreed in a collective of its own, as before
        self.stop.agreed()


def _time_steps(cfg, ds, batch_cfg, ctx, batches, warmup, steps, result, guards='off', ema='auto'):
    """`warmup` and `steps` count optimizer steps, each of grad_accum micro-steps and the momentum update; the
    timer marks the end of each (the durations are whole optimizer steps)."""
    from .pretrain import build_engine

    engine, model, result.optimizer = build_engine(
        cfg, ds, batch_cfg, ctx, scaled_lr(cfg.train.base_lr, batch_cfg.global_batch)
    )
    if ema == 'bf16':
        object.__setattr__(model, '_master_ema', None)
    guard = None if guards == 'off' else Guards(cfg, batch_cfg, ctx, engine, immediate=guards == 'immediate')
    dtype, gen = compute_dtype(batch_cfg), mask_generator(cfg, ctx)
    timer, wait = StepTimer(ctx.device), 0.0
    for i in range(warmup + steps):
        if i == warmup:
            timer.mark()
        for _ in range(batch_cfg.grad_accum):  # a fresh engine: its last micro-step here is the boundary
            t0 = clock()
            batch = next(batches)
            if i >= warmup:
                wait += clock() - t0
            out = train_step(engine, batch, dtype, gen)
            if guard is not None:
                guard.after_micro_step(out)
        if guard is not None:
            guard.after_step(i + 1)
        momentum_step(model, 0.996, batch_cfg.zero_stage)
        if i >= warmup:
            timer.mark()
    times = timer.durations_ms()
    result.attention = last_impl('attention')
    result.extra.update(compile=model.compiled.scope, compile_s=round(model.compiled.compile_s, 1))
    if model.compiled.fallback:
        result.extra['compile_fallback'] = model.compiled.fallback
    result.extra['micro_steps_per_step'] = batch_cfg.grad_accum
    result.extra['ema_impl'] = last_impl('ema')
    if guard is not None:
        result.extra['guard_events'] = guard.events
    del engine, model
    gc.collect()
    return times, wait * 1000 / max(sum(times), 1e-9)


def _fill(result: BenchResult, cfg, batch_cfg, ctx, times, wait, peak_override) -> None:
    result.step_ms_median, result.step_ms_p90 = statistics.median(times), _percentile(times, 0.9)
    per_step = batch_cfg.micro_batch * (1 if result.mode == 'data' else batch_cfg.grad_accum)
    result.images_per_s_per_device = per_step * len(times) * 1000 / max(sum(times), 1e-9)
    result.images_per_s_total = result.images_per_s_per_device * ctx.world_size
    result.peak_mem_gib = _peak_mem_gib(ctx.device)
    if result.mode == 'data':
        return
    result.data_wait_fraction = wait
    gflop = flops_per_image(cfg.model)['total'] / 1e9
    result.gflop_per_image = gflop
    result.tflops_per_device = result.images_per_s_per_device * gflop / 1000
    name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == 'cuda' else 'cpu'
    peak = peak_override if peak_override else peak_tflops(name)
    result.mfu = mfu(result.images_per_s_per_device, gflop * 1e9, peak) if peak else None


def format_table(results: list[BenchResult]) -> str:
    head = (
        'mode',
        'size',
        'ds_config',
        'micro',
        'img/s/dev',
        'img/s',
        'ms med',
        'ms p90',
        'TFLOP/s',
        'MFU',
        'mem GiB',
        'wait',
        'attn',
        'optim',
        'error',
    )
    rows = [head]
    for r in results:
        rows.append(
            (
                r.mode,
                r.size,
                r.ds_config,
                str(r.micro_batch),
                f'{r.images_per_s_per_device:.1f}',
                f'{r.images_per_s_total:.1f}',
                f'{r.step_ms_median:.1f}',
                f'{r.step_ms_p90:.1f}',
                '-' if r.tflops_per_device is None else f'{r.tflops_per_device:.3f}',
                '-' if r.mfu is None else f'{100 * r.mfu:.1f}%',
                '-' if r.peak_mem_gib is None else f'{r.peak_mem_gib:.2f}',
                '-' if r.data_wait_fraction is None else f'{r.data_wait_fraction:.2f}',
                r.attention or '-',
                r.optimizer or '-',
                (r.error or '')[:60],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return '\n'.join('  '.join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)
