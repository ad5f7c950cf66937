"""Pieces every engine loop shares (pretraining, fine-tuning, benchmark): run folder, resume rules, precision,
learning-rate setting, the non-finite guard, throughput metering and the consolidated fp32 model state."""
from __future__ import annotations

import json
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Optional

import torch
import yaml

from ..config import ConfigError
from ..ds_config import ResolvedBatch
from ..schedules import lr_at, scaled_lr
from . import checkpointing


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; training stopped without saving."""


def dtype_of(batch: ResolvedBatch) -> torch.dtype:
    return {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(batch.precision, torch.float32)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)


def resume_tag(resume: str, ckpt_dir: Path) -> Optional[str]:
    """Verified resume rules: checkpointing.select_resume_tag."""
    return checkpointing.select_resume_tag(resume, ckpt_dir)


def write_run_files(run_dir: Path, cfg, ds: dict, step: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    suffix = '' if step == 0 else f'.resume_{step:08d}'
    (run_dir / f'config{suffix}.yaml').write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (run_dir / f'ds_config{suffix}.json').write_text(json.dumps(ds, indent=2))


def grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def loss_scale(engine) -> Optional[float]:
    scale = getattr(engine.optimizer, 'cur_scale', None) or getattr(engine.optimizer, 'loss_scale', None)
    return float(scale) if isinstance(scale, (int, float, torch.Tensor)) else None


class Meter:
    """Throughput and data-wait fraction between log steps, host-side only."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.start, self.wait, self.images = time.perf_counter(), 0.0, 0

    def values(self, world_size: int) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {'images_per_s': self.images * world_size / elapsed, 'data_wait_fraction': self.wait / elapsed}


def consolidated_state_dict(engine, model: torch.nn.Module, zero_stage: int) -> dict:
    """Full fp32 model state (online from the optimizer's fp32 masters where DeepSpeed has them, target as kept).
    Collective: every rank must call it."""
    from deepspeed.utils import safe_get_full_fp32_param
    state = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for p in model.parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:
            full = _gathered(p, zero_stage)
        state[names[id(p)]] = full.detach().float().cpu().clone()
    for name, value in model.state_dict().items():
        if name not in state:
            state[name] = value.detach().cpu().clone().float() if value.is_floating_point() else value.cpu()
    return state


def _gathered(p, zero_stage):
    if zero_stage != 3:
        return p
    import deepspeed
    with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
        return p.detach().clone()


def due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def check_finite(flag: torch.Tensor, step: int, ckpt_dir: Path) -> None:
    if bool(flag):
        last = checkpointing.find_resume_tag(ckpt_dir)
        raise NonFiniteLoss(f'the loss became NaN or inf at or before step {step}; stopped without saving. '
                            f'Last good checkpoint: {ckpt_dir / last if last else "none"}')


@dataclass(frozen=True)
class Schedule:
    """The learning rate of a run as a pure function of the optimizer step."""
    peak_lr: float
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int
    warmup_start_factor: float
    min_lr: float

    def lr(self, step: int) -> float:
        return lr_at(step, base_lr=self.peak_lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                     warmup_start_factor=self.warmup_start_factor, min_lr=self.min_lr)


def make_schedule(opt, batch_cfg: ResolvedBatch, batches_per_epoch: int, ds_path: str) -> Schedule:
    """`opt`: a section with base_lr (per 256 images), epochs, warmup_epochs, warmup_start_factor and min_lr."""
    steps_per_epoch = batches_per_epoch // batch_cfg.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f'{ds_path}: {batches_per_epoch} micro-batches per rank per epoch are fewer than '
                          f'gradient_accumulation_steps {batch_cfg.grad_accum}: the dataset is too small for a '
                          f'global batch of {batch_cfg.global_batch}')
    return Schedule(peak_lr=scaled_lr(opt.base_lr, batch_cfg.global_batch), total_steps=opt.epochs * steps_per_epoch,
                    warmup_steps=opt.warmup_epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch,
                    warmup_start_factor=opt.warmup_start_factor, min_lr=opt.min_lr)
