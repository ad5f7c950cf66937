"""In-process pretraining runs (one rank, gloo, the real DeepSpeed engine and loop) that record what the run did,
read from the components themselves: the lr of each parameter group when the optimizer steps (a step pre-hook),
the target momentum from the EMA (the weights before and after it), every micro-step's losses (a forward hook),
the grad norm and the times around each step."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cmae_ds.config import load_config
from cmae_ds.engine import dist
from cmae_ds.tasks.pretrain import train

from engine_helpers import TINY, write_ds

# 16 JPEGs at micro-batch 4: 4 micro-batches per epoch, 2 optimizer steps at accumulation 2; 4 epochs with one of
# warm-up: 8 steps, of which steps 0-1 warm up and 2-7 follow the cosine.
ARGS = TINY + [
    'data.source=folder',
    'data.pipeline=torch',
    'data.num_workers=0',
    'train.epochs=4',
    'train.warmup_epochs=1',
    'train.warmup_start_factor=0.1',  # the first steps move the weights well above fp32 rounding: see momentum_of
    'train.base_lr=0.05',
    'train.momentum_base=0.5',  # far from the end value, so every step's momentum differs from its neighbours'
    'train.momentum_end=0.9',
    'train.save_every_steps=4',
    'train.keep_last=0',
]


GROUP_ENV = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


@contextmanager
def one_rank_group():
    """Around in-process runs: their one-rank group is destroyed afterwards and the environment it wrote (RANK,
    MASTER_PORT, ...) put back, so that launch scripts this pytest process starts later make their own group
    instead of taking that environment for theirs and trying to serve a port this process holds."""
    saved = {k: os.environ.get(k) for k in GROUP_ENV}
    try:
        yield
    finally:
        dist.shutdown_distributed()
        restore_group_env(saved)


def restore_group_env(saved: dict) -> None:
    """Put RANK, MASTER_PORT, ... back as `saved` had them; the next setup_distributed makes its own again."""
    dist._own_env = False
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def momentum_of(before: torch.Tensor, after: torch.Tensor, online: torch.Tensor) -> float:
    """m of after = m * before + (1 - m) * online, by least squares over every element. A step must move the weights
    well above their fp32 spacing (LayerNorm weights near 1 have 1.2e-7) for this to be exact to ~1e-4."""
    before, after, online = before.double(), after.double(), online.double()
    d = before - online
    return float(((after - online) * d).sum() / (d * d).sum())


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().float().flatten() for t in tensors]).clone()


@dataclass
class Record:
    events: list = field(default_factory=list)  # 'f' per micro-step forward, 's' per optimizer step, in order
    lrs: list = field(default_factory=list)  # per optimizer step: the lr of each group as it stepped
    momenta: dict = field(default_factory=dict)  # step -> the momentum the EMA applied after it
    losses: list = field(default_factory=list)  # per micro-step: {'loss', 'loss_rec', 'loss_con'}
    grad_norms: dict = field(default_factory=dict)  # step -> engine.get_global_grad_norm()
    forward_end: list = field(default_factory=list)  # perf_counter at the end of each micro-step's forward
    observed: dict = field(default_factory=dict)  # step -> perf_counter when the observer is called
    start_step: int = -1
    result: object = None


class Recorder:
    def __init__(self):
        self.rec = Record()
        self._target = None

    def __call__(self, step, engine, model):
        self.rec.observed[step] = time.perf_counter()
        targets, sources = model.ema_pairs()
        if self._target is None:
            self.rec.start_step = step
            self._hook(engine, model)
        else:
            self.rec.momenta[step] = momentum_of(self._target, _flat(targets), _flat(sources))
            self.rec.grad_norms[step] = float(engine.get_global_grad_norm())
        self._target = _flat(targets)

    def _hook(self, engine, model):
        def on_forward(_module, _args, out):
            self.rec.events.append('f')
            self.rec.forward_end.append(time.perf_counter())
            self.rec.losses.append({k: float(out[k].detach()) for k in ('loss', 'loss_rec', 'loss_con')})

        def on_step(optimizer, _args, _kwargs):
            lrs = [g['lr'] for g in optimizer.param_groups]
            if self.rec.events[-1:] == ['s']:  # ZeRO 1-2 step their groups one at a time: one optimizer step
                self.rec.lrs[-1] += lrs
                return
            self.rec.events.append('s')
            self.rec.lrs.append(lrs)

        model.register_forward_hook(on_forward)
        # the optimizer that updates the weights: DeepSpeed's ZeRO wrappers hold it as .optimizer
        getattr(engine.optimizer, 'optimizer', engine.optimizer).register_step_pre_hook(on_step)


def run(tmp: Path, images: Path, name: str, *extra, accum: int = 2, resume: str = 'auto') -> Record:
    """One in-process run in tmp/name, ZeRO-1 (DeepSpeed computes the grad norm under ZeRO, not under fp32 ZeRO-0
    without clipping); returns what it recorded."""
    ds = write_ds(tmp, f'{name}.json', gradient_accumulation_steps=accum, zero_optimization={'stage': 1})
    cfg = load_config(None, ARGS + [f'data.root={images}', f'train.output_dir={tmp / name}', *extra])
    recorder = Recorder()
    recorder.rec.result = train(cfg, ds, resume=resume, observer=recorder)
    return recorder.rec
