"""Fine-tuning (spec section 9) and linear probing under DeepSpeed: one explicit loop, `train()` -> `train_step()`.

Same idioms as engine.pretrain: the lr is set per optimizer step (warmup, then cosine to min_lr) and multiplied by
each group's 'lr_scale' (layer-wise decay); the non-finite check reads a device flag only at log and save steps;
resumable DeepSpeed checkpoints go through engine.checkpointing. At each epoch's end (every eval_every_epochs) the
model is evaluated (top-1 / top-5, each validation image once), then `model_last.pt` and, when top-1 improved,
`model_best.pt` are written: self-describing fp32 classifier files that launch/evaluate.py reads.

Run folder: config.yaml, ds_config.json, checkpoints/ (resume), model_best.pt, model_last.pt, metrics.jsonl
(one line per evaluation), tensorboard/.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..checkpoint import classifier_from_pretrained
from ..config import ConfigError, FinetuneConfig, LinearProbeConfig, TaskConfig
from ..data import build_classification_loader, list_samples
from ..ds_config import ResolvedBatch, check_precision_supported, load_ds_config, validate
from ..models import ViTClassifier
from . import checkpointing
from .dist import DistContext, setup_distributed
from .evaluate import BEST, LAST, EvalResult, check_labels, evaluate, save_classifier_file
from .linprobe import build_probe_optimizer, probe_from_pretrained, probe_param_groups
from .logger import RunLogger
from .lr_decay import layer_decay_groups
from .optim import build_optimizer
# Shared with pretraining (same run-folder, resume and logging rules).
from .common import (Meter, NonFiniteLoss, check_finite, consolidated_state_dict, dtype_of, due, grad_norm,
                     Schedule, make_schedule, resume_tag, set_lr, write_run_files)

__all__ = ['train', 'train_step', 'FinetuneResult', 'NonFiniteLoss']


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint's client state."""
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already trained on
    step: int = 0  # optimizer steps taken
    best_top1: float = -1.0
    best_epoch: int = -1


@dataclass
class FinetuneResult:
    run_dir: Path
    steps: int
    last_loss: Optional[float]
    evals: list  # [(epoch, EvalResult)] of this invocation
    best_top1: float
    best_file: Optional[Path]
    last_file: Optional[Path]


def _is_probe(cfg: TaskConfig) -> bool:
    return isinstance(cfg.task, LinearProbeConfig)


def _img_size(cfg: TaskConfig) -> int:
    return cfg.task.img_size or cfg.model.img_size


def _check_task(cfg: TaskConfig, ds: dict, batch_cfg: ResolvedBatch, path: str) -> None:
    task, micro = cfg.task, batch_cfg.micro_batch
    if not task.pretrained:
        scratch = '' if _is_probe(cfg) else ", or 'none' to train from scratch"
        raise ConfigError(f'{task.section}.pretrained: set the starting weights (a pretraining run folder or its '
                          f'model.pt, an extracted encoder, an official checkpoint){scratch}')
    if isinstance(task, FinetuneConfig) and task.mixes and micro % 2:
        raise ConfigError(f'{path}: train_micro_batch_size_per_gpu {micro} must be even: Mixup/CutMix pairs images '
                          'within a batch (or turn mixing off: finetune.mixup=0 finetune.cutmix=0)')
    if _is_probe(cfg):
        if micro < 2:
            raise ConfigError(f'{path}: train_micro_batch_size_per_gpu {micro} < 2: the probe\'s BatchNorm needs '
                              'at least 2 images per rank')
        if batch_cfg.zero_stage > 0 and not ds.get('zero_allow_untested_optimizer', False):
            raise ConfigError(f'{path}: ZeRO stage {batch_cfg.zero_stage} with the probe\'s {task.optimizer.upper()} '
                              'optimizer needs "zero_allow_untested_optimizer": true (or use stage 0: the probe '
                              'trains one linear layer)')


def _pretrained_path(source: str):
    """A pretraining run folder means its model.pt."""
    path = Path(source)
    return path / 'model.pt' if path.is_dir() else source


def build_model(cfg: TaskConfig, trust: bool = False) -> nn.Module:
    """The classifier (fine-tuning) or the probe, with the pretrained weights; every rank builds the same one."""
    task, size = cfg.task, _img_size(cfg)
    if _is_probe(cfg):
        return probe_from_pretrained(_pretrained_path(task.pretrained), cfg.model, task.num_classes, pool=task.pool,
                                     img_size=size, trust=trust)
    if task.pretrained.lower() == 'none':
        return ViTClassifier(cfg.model, task.num_classes, drop_path=task.drop_path, img_size=size)
    return classifier_from_pretrained(_pretrained_path(task.pretrained), cfg.model, task.num_classes,
                                      drop_path=task.drop_path, img_size=size, trust=trust)


def build_engine(cfg: TaskConfig, ds: dict, batch_cfg: ResolvedBatch, ctx: DistContext, peak_lr: float,
                 trust: bool = False):
    """(engine, model, optimizer name). Fine-tuning: AdamW over layer-decay groups; probing: LARS/SGD on the head."""
    import deepspeed
    torch.manual_seed(cfg.task.seed)
    model, task = build_model(cfg, trust), cfg.task
    if _is_probe(cfg):
        optimizer, name = build_probe_optimizer(probe_param_groups(model, task.weight_decay), name=task.optimizer,
                                                lr=peak_lr, momentum=task.momentum)
    else:
        groups = layer_decay_groups(model, weight_decay=task.weight_decay, layer_decay=task.layer_decay,
                                    depth=cfg.model.depth)
        optimizer, name = build_optimizer(groups, lr=peak_lr, betas=task.betas, backend=task.optimizer,
                                          device=ctx.device, offload=batch_cfg.offload_optimizer)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    return engine, model, name


def build_criterion(cfg: TaskConfig):
    """(mixup or None, loss(logits fp32 (N, C), target) -> scalar). timm's Mixup makes soft targets that already
    include the label smoothing."""
    task = cfg.task
    if _is_probe(cfg):
        return None, nn.CrossEntropyLoss()
    if task.mixes:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy
        mixup = Mixup(mixup_alpha=task.mixup, cutmix_alpha=task.cutmix, prob=task.mixup_prob,
                      switch_prob=task.mixup_switch_prob, mode='batch', label_smoothing=task.smoothing,
                      num_classes=task.num_classes)
        return mixup, SoftTargetCrossEntropy()
    if task.smoothing > 0:
        from timm.loss import LabelSmoothingCrossEntropy
        return None, LabelSmoothingCrossEntropy(smoothing=task.smoothing)
    return None, nn.CrossEntropyLoss()


def train_step(engine, batch: dict, dtype: torch.dtype, mixup, criterion) -> torch.Tensor:
    """One micro-step; returns the loss (still on the device). Mixing happens in fp32 before the cast."""
    img, target = batch['img'].to(engine.device, non_blocking=True), batch['label'].to(engine.device)
    if mixup is not None:
        img, target = mixup(img, target)
    logits = engine(img.to(dtype))
    loss = criterion(logits.float(), target)
    engine.backward(loss)
    engine.step()
    return loss


def _seed_rngs(seed: int, rank: int, step: int) -> None:
    """Per-rank streams for drop path (torch) and Mixup (numpy, python). Reseeded from the step on resume: DeepSpeed
    keeps only rank 0's client state under ZeRO 0-2, so restored RNG states would make all ranks draw alike."""
    key = (seed * 1_000_003 + rank) * 1_000_003 + step
    torch.manual_seed(key % 2 ** 63)
    np.random.seed(key % 2 ** 32)
    random.seed(key)


def _loaders(cfg: TaskConfig, batch_cfg: ResolvedBatch, ctx: DistContext):
    task, size = cfg.task, _img_size(cfg)
    train_samples, val_samples = list_samples(cfg.data), list_samples(cfg.val_data)
    check_labels(train_samples, task.num_classes, 'data')
    check_labels(val_samples, task.num_classes, 'val_data')
    common = dict(img_size=size, rank=ctx.rank, world_size=ctx.world_size, seed=task.seed, device=ctx.device,
                  hw_decoder_load=cfg.data.hw_decoder_load)
    # MAE's linear probe trains on crop + flip alone; fine-tuning adds RandAugment and random erasing.
    augment = 'probe' if isinstance(task, LinearProbeConfig) else 'finetune'
    train_loader = build_classification_loader(cfg.data, train=True, batch_size=batch_cfg.micro_batch,
                                               samples=train_samples, augment=augment, **common)
    val_loader = build_classification_loader(cfg.val_data, train=False,
                                             batch_size=task.eval_batch_size or batch_cfg.micro_batch,
                                             samples=val_samples, **common)
    return train_loader, val_loader


def train(cfg: TaskConfig, ds_path: str, resume: str = 'auto', trust_checkpoint: bool = False) -> FinetuneResult:
    """Fine-tune (cfg.task a FinetuneConfig) or linearly probe (a LinearProbeConfig) with the DeepSpeed JSON at
    `ds_path`. `resume`: 'auto' (newest complete checkpoint of the run folder), 'none', or a tag.
    `trust_checkpoint`: read the pretrained weights and the resumed checkpoint without cmae_ds.safe_load's checks."""
    task = cfg.task
    ds = load_ds_config(ds_path)
    ctx = setup_distributed()
    batch_cfg = validate(ds, None, ctx.world_size, path=ds_path)
    check_precision_supported(batch_cfg, ds_path)
    _check_task(cfg, ds, batch_cfg, ds_path)
    run_dir = Path(task.output_dir)
    ckpt_dir = run_dir / 'checkpoints'
    tag = resume_tag(resume, ckpt_dir)
    loader, val_loader = _loaders(cfg, batch_cfg, ctx)
    schedule = make_schedule(cfg.task, batch_cfg, len(loader), ds_path)
    engine, model, opt_name = build_engine(cfg, ds, batch_cfg, ctx, schedule.peak_lr, trust_checkpoint)
    progress = Progress()
    if tag is not None:
        progress = Progress(**checkpointing.load(engine, ckpt_dir, tag, trust=trust_checkpoint)['progress'])
    _seed_rngs(task.seed, ctx.rank, progress.step)
    if ctx.is_main:
        write_run_files(run_dir, cfg, ds, progress.step)
    logger = RunLogger(run_dir, schedule.total_steps, progress.step, ctx.is_main, task.progress_bar)
    logger.text(f'cmae_ds {task.section}: {cfg.model.size} at {_img_size(cfg)} px, {task.num_classes} classes, data '
                f'pipeline {loader.name}, optimizer {opt_name}, {batch_cfg.precision} ZeRO-{batch_cfg.zero_stage}, '
                f'global batch {batch_cfg.global_batch}, peak lr {schedule.peak_lr:.3g}, {schedule.total_steps} steps'
                + (f', resumed from {tag}' if tag else ''))
    run = Run(cfg, ctx, engine, model, batch_cfg, schedule, progress, logger, ckpt_dir, val_loader,
              *build_criterion(cfg))
    try:
        return _loop(run, loader)
    finally:
        logger.close()


@dataclass
class Run:
    """What the loop and its per-step and per-epoch functions share."""
    cfg: TaskConfig
    ctx: DistContext
    engine: object
    model: nn.Module
    batch_cfg: ResolvedBatch
    schedule: Schedule
    progress: Progress
    logger: RunLogger
    ckpt_dir: Path
    val_loader: object
    mixup: object
    criterion: object
    nonfinite: Optional[torch.Tensor] = None
    loss_sum: Optional[torch.Tensor] = None  # device-side, since the last log step (logged as a mean)
    loss_count: int = 0
    last_loss: Optional[float] = None
    evals: Optional[list] = None


def _loop(run: Run, loader) -> FinetuneResult:
    task, p, bc = run.cfg.task, run.progress, run.batch_cfg
    dtype = dtype_of(bc)
    last_step = run.schedule.total_steps if task.max_steps <= 0 else min(run.schedule.total_steps,
                                                                         p.step + task.max_steps)
    usable = run.schedule.steps_per_epoch * bc.grad_accum  # a partial accumulation at an epoch's end is dropped
    run.nonfinite, run.evals, meter = torch.zeros((), dtype=torch.bool, device=run.engine.device), [], Meter()
    run.loss_sum = torch.zeros((), device=run.engine.device)
    set_lr(run.engine.optimizer, run.schedule.lr(p.step))
    while p.step < last_step:
        loader.set_epoch(p.epoch)
        if p.batch_in_epoch:
            loader.skip_batches(p.batch_in_epoch)
        epoch_done = False
        for batch in loader:
            boundary = run.engine.is_gradient_accumulation_boundary()
            loss = train_step(run.engine, batch, dtype, run.mixup, run.criterion)
            run.nonfinite |= ~torch.isfinite(loss.detach())
            run.loss_sum, run.loss_count = run.loss_sum + loss.detach().float(), run.loss_count + 1
            meter.images += batch['img'].shape[0]
            p.batch_in_epoch += 1
            epoch_done = p.batch_in_epoch >= usable
            if epoch_done:
                p.epoch, p.batch_in_epoch = p.epoch + 1, 0
            if boundary:
                p.step += 1
                _after_step(run, meter, final=p.step == last_step and not epoch_done)
            if epoch_done or p.step >= last_step:
                break
        if epoch_done:
            _end_of_epoch(run, final=p.step >= last_step)
    run_dir = run.ckpt_dir.parent
    best, last = run_dir / BEST, run_dir / LAST  # written by this invocation or the one it resumed
    return FinetuneResult(run_dir, p.step, run.last_loss, run.evals, p.best_top1,
                          best if best.is_file() else None, last if last.is_file() else None)


def _after_step(run: Run, meter: Meter, final: bool) -> None:
    """Once per optimizer step: next lr, logging, optional mid-epoch checkpoint; `final` when the run stops
    mid-epoch (max_steps), which then ends like an epoch: evaluation, model files, checkpoint."""
    task, step = run.cfg.task, run.progress.step
    set_lr(run.engine.optimizer, run.schedule.lr(step))
    run.logger.advance()
    if due(step, task.log_every_steps) or final:
        check_finite(run.nonfinite, step, run.ckpt_dir)
        values = {'loss': float(run.loss_sum) / max(run.loss_count, 1), 'lr': run.schedule.lr(step),
                  'epoch': run.progress.epoch + run.progress.batch_in_epoch / max(1, run.schedule.steps_per_epoch)}
        norm = grad_norm(run.engine)
        if norm is not None:
            values['grad_norm'] = norm
        values.update(meter.values(run.ctx.world_size))
        run.logger.scalars(step, values)
        run.last_loss = values['loss']
        run.loss_sum, run.loss_count = torch.zeros_like(run.loss_sum), 0
        meter.reset()
    if final:
        _end_of_epoch(run, final=True)
    elif due(step, task.save_every_steps):
        _save_checkpoint(run)


def _end_of_epoch(run: Run, final: bool) -> None:
    """Evaluate when due (always at the end of the run), write model_last.pt / model_best.pt, then a checkpoint."""
    task, p = run.cfg.task, run.progress
    check_finite(run.nonfinite, p.step, run.ckpt_dir)
    result = None
    if final or due(p.epoch, task.eval_every_epochs):
        result = run_evaluation(run.engine, run.val_loader, dtype_of(run.batch_cfg))
        run.evals.append((p.epoch, result))
        _log_eval(run, result)
    improved = result is not None and result.top1 > p.best_top1
    if improved:
        p.best_top1, p.best_epoch = result.top1, p.epoch
    _write_model_files(run, result, improved)
    _save_checkpoint(run)


def run_evaluation(engine, val_loader, dtype: torch.dtype) -> EvalResult:
    """Top-1/top-5 of the engine's model in eval mode (collective); training mode is restored afterwards."""
    engine.eval()
    try:
        val_loader.set_epoch(0)
        return evaluate(lambda img: engine(img.to(dtype)), val_loader, engine.device)
    finally:
        engine.train()


def _log_eval(run: Run, result: EvalResult) -> None:
    p = run.progress
    run.logger.text(f'epoch {p.epoch} (step {p.step}): top-1 {result.top1:.2f}  top-5 {result.top5:.2f}  '
                    f'loss {result.loss:.4f}  ({result.images} images)')
    if run.logger.enabled:
        for name in ('top1', 'top5', 'loss'):
            run.logger.writer.add_scalar(f'val/{name}', getattr(result, name), p.step)
        with open(run.ckpt_dir.parent / 'metrics.jsonl', 'a') as f:
            f.write(json.dumps({'epoch': p.epoch, 'step': p.step, **result.as_dict()}) + '\n')


def _write_model_files(run: Run, result: Optional[EvalResult], improved: bool) -> None:
    """Consolidated fp32 weights (collective) into the self-describing files that launch/evaluate.py reads."""
    state = consolidated_state_dict(run.engine, run.model, run.batch_cfg.zero_stage)
    if not run.ctx.is_main:
        return
    cfg, task, p = run.cfg, run.cfg.task, run.progress
    extra = {'epoch': p.epoch, 'step': p.step, 'metrics': result.as_dict() if result else None,
             'pretrained': task.pretrained}
    if _is_probe(cfg):
        extra['pool'] = task.pool
    kw = dict(kind=task.section, model_cfg=cfg.model, num_classes=task.num_classes, img_size=_img_size(cfg),
              extra=extra)
    run_dir = run.ckpt_dir.parent
    save_classifier_file(run_dir / LAST, state, **kw)
    if improved:
        save_classifier_file(run_dir / BEST, state, **kw)


def _save_checkpoint(run: Run) -> None:
    client = {'progress': asdict(run.progress), 'config': run.cfg.to_dict()}
    checkpointing.save(run.engine, run.ckpt_dir, run.progress.step, client, run.cfg.task.keep_last, run.ctx.is_main)
