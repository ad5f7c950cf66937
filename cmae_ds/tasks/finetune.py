"""Fine-tuning (docs/spec.md section 9) and linear probing under DeepSpeed: `train()` builds the run, `engine.loop` runs
it, `ClassifierTask` is what is particular to classification.

The lr is multiplied by each group's 'lr_scale' (layer-wise decay). At each epoch's end (every eval_every_epochs)
the model is evaluated (top-1 / top-5, each validation image once), then `model_last.safetensors` and, when top-1
improved, `model_best.safetensors` are written: self-describing fp32 classifier files that launch/evaluate.py reads.
A run that stops mid-epoch (max_steps) ends like an epoch.

Run folder: config.yaml, ds_config.json, checkpoints/ (resume), model_best.safetensors, model_last.safetensors,
metrics.jsonl (one line per evaluation), tensorboard/.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import ConfigError, LinearProbeConfig, TaskConfig
from ..config.ds_config import ResolvedBatch, compute_dtype
from ..data import build_classification_loader, list_samples
from ..engine.checkpoints.model_state import consolidated_state_dict
from ..engine.checkpoints.resume import restore
from ..engine.checkpoints.store import Checkpointer
from ..engine.compile import apply_compile
from ..engine.dist import DistContext
from ..engine.logger import RunLogger
from ..engine.loop import Loop, Progress, RunStart, start_run
from ..engine.lr_decay import layer_decay_groups
from ..engine.metrics import StepMetrics, due
from ..engine.optim import build_optimizer, build_probe_optimizer, probe_param_groups, undo_initial_step
from ..engine.run_files import write_run_files
from ..engine.schedules import make_schedule
from ..errors import NonFiniteLoss
from ..modelfiles.classifier import BEST, LAST, save_classifier_file
from ..modelfiles.formats import classifier_from_pretrained, probe_from_pretrained
from ..modelfiles.model_card import run_facts
from ..modelfiles.model_file import run_model_file
from ..models import ViTClassifier
from ..seeds import model_seed, seed_classifier_rank
from .batch_mix import BatchMix
from .evaluate import EvalResult, check_labels, evaluate

__all__ = ['train', 'train_step', 'FinetuneResult', 'NonFiniteLoss']


@dataclass
class ClassifierProgress(Progress):
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
        raise ConfigError(
            f'{task.section}.pretrained: set the starting weights (a pretraining run folder or its '
            f'model.safetensors, an extracted encoder, an official checkpoint){scratch}'
        )
    if _is_probe(cfg):
        if micro < 2:
            raise ConfigError(
                f"{path}: train_micro_batch_size_per_gpu {micro} < 2: the probe's BatchNorm needs "
                'at least 2 images per rank'
            )
        if batch_cfg.zero_stage > 0 and not ds.get('zero_allow_untested_optimizer', False):
            raise ConfigError(
                f"{path}: ZeRO stage {batch_cfg.zero_stage} with the probe's {task.optimizer.upper()} "
                'optimizer needs "zero_allow_untested_optimizer": true (or use stage 0: the probe '
                'trains one linear layer)'
            )


def _pretrained_path(source: str):
    """A pretraining run folder means its end-of-run model file."""
    path = Path(source)
    return run_model_file(path) if path.is_dir() else source


def build_model(cfg: TaskConfig, trust: bool = False) -> nn.Module:
    """The classifier (fine-tuning) or the probe, with the pretrained weights; every rank builds the same one."""
    task, size = cfg.task, _img_size(cfg)
    if _is_probe(cfg):
        return probe_from_pretrained(
            _pretrained_path(task.pretrained), cfg.model, task.num_classes, pool=task.pool, img_size=size, trust=trust
        )
    if task.pretrained.lower() == 'none':
        return ViTClassifier(cfg.model, task.num_classes, drop_path=task.drop_path, img_size=size)
    return classifier_from_pretrained(
        _pretrained_path(task.pretrained),
        cfg.model,
        task.num_classes,
        drop_path=task.drop_path,
        img_size=size,
        trust=trust,
    )


def build_engine(
    cfg: TaskConfig, ds: dict, batch_cfg: ResolvedBatch, ctx: DistContext, peak_lr: float, trust: bool = False
):
    """(engine, model, optimizer name). Fine-tuning: AdamW over layer-decay groups; probing: LARS/SGD on the head."""
    import deepspeed

    torch.manual_seed(model_seed(cfg.task.seed))
    model, task = build_model(cfg, trust), cfg.task
    model.compiled = apply_compile(model, cfg.model.compile, ctx.device, batch_cfg.zero_stage)
    if _is_probe(cfg):
        optimizer, name = build_probe_optimizer(
            probe_param_groups(model, task.weight_decay), name=task.optimizer, lr=peak_lr, momentum=task.momentum
        )
    else:
        groups = layer_decay_groups(
            model, weight_decay=task.weight_decay, layer_decay=task.layer_decay, depth=cfg.model.depth
        )
        optimizer, name = build_optimizer(
            groups,
            lr=peak_lr,
            betas=task.betas,
            backend=task.optimizer,
            device=ctx.device,
            offload=batch_cfg.offload_optimizer,
        )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    undo_initial_step(engine)
    return engine, model, name


def build_criterion(cfg: TaskConfig):
    """(mixup or None, loss(logits fp32 (N, C), target) -> scalar). The official batch mixing (batch_mix.py) makes
    soft targets that already include the label smoothing."""
    task = cfg.task
    if _is_probe(cfg):
        return None, nn.CrossEntropyLoss()
    if task.mixes:
        from timm.loss import SoftTargetCrossEntropy

        mixup = BatchMix(
            task.mixup, task.cutmix, task.mixup_prob, task.mixup_switch_prob, task.smoothing, task.num_classes
        )
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


def _loaders(cfg: TaskConfig, batch_cfg: ResolvedBatch, ctx: DistContext):
    task, size = cfg.task, _img_size(cfg)
    train_samples, val_samples = list_samples(cfg.data), list_samples(cfg.val_data)
    check_labels(train_samples, task.num_classes, 'data')
    check_labels(val_samples, task.num_classes, 'val_data')
    common = dict(img_size=size, rank=ctx.rank, world_size=ctx.world_size, seed=task.seed, device=ctx.device)
    # MAE's linear probe trains on crop + flip alone; fine-tuning adds RandAugment and random erasing.
    augment = 'probe' if isinstance(task, LinearProbeConfig) else 'finetune'
    train_loader = build_classification_loader(
        cfg.data, train=True, batch_size=batch_cfg.micro_batch, samples=train_samples, augment=augment, **common
    )
    val_loader = build_classification_loader(
        cfg.val_data,
        train=False,
        batch_size=task.eval_batch_size or batch_cfg.micro_batch,
        samples=val_samples,
        **common,
    )
    return train_loader, val_loader


class ClassifierTask:
    """What is particular to classification: the micro-step with Mixup/CutMix, and at each epoch's end (or a
    run's last step) the evaluation, the model files and the best top-1 so far."""

    loss_keys = ('loss',)

    def __init__(
        self,
        cfg: TaskConfig,
        run: RunStart,
        engine,
        model: nn.Module,
        logger: RunLogger,
        progress: ClassifierProgress,
        val_loader,
    ):
        self.cfg, self.run, self.engine, self.model, self.logger = cfg, run, engine, model, logger
        self.progress, self.val_loader = progress, val_loader
        self.dtype = compute_dtype(run.batch)
        self.mixup, self.criterion = build_criterion(cfg)
        self.evals: list = []

    def train_step(self, batch: dict) -> dict:
        return {'loss': train_step(self.engine, batch, self.dtype, self.mixup, self.criterion)}

    def after_step(self, loop: Loop, batch: dict, out: dict, final: bool) -> None:
        pass

    def log_values(self, step: int) -> dict:
        return {}

    def end_of_epoch(self, loop: Loop, final: bool) -> None:
        """Evaluate when due (always at the end of the run), then write model_last / model_best."""
        p = self.progress
        loop.metrics.check_finite(p.step)
        result = None
        if final or due(p.epoch, self.cfg.task.eval_every_epochs):
            result = run_evaluation(self.engine, self.val_loader, self.dtype)
            self.evals.append((p.epoch, result))
            self._log_eval(result)
        improved = result is not None and result.top1 > p.best_top1
        if improved:
            p.best_top1, p.best_epoch = result.top1, p.epoch
        self._write_model_files(result, improved, loop.metrics.last_loss)

    def load_checkpoint(self, tag: str, steps_per_epoch: int) -> dict:
        return load_checkpoint(self.cfg, self.run, self.engine, self.model, tag, steps_per_epoch)

    def client_state(self) -> dict:
        return {'progress': asdict(self.progress), 'config': self.cfg.to_dict()}

    def _log_eval(self, result: EvalResult) -> None:
        p = self.progress
        self.logger.text(
            f'epoch {p.epoch} (step {p.step}): top-1 {result.top1:.2f}  top-5 {result.top5:.2f}  '
            f'loss {result.loss:.4f}  ({result.images} images)'
        )
        if self.logger.enabled:
            for name in ('top1', 'top5', 'loss'):
                self.logger.writer.add_scalar(f'val/{name}', getattr(result, name), p.step)
            with open(self.run.run_dir / 'metrics.jsonl', 'a') as f:
                f.write(json.dumps({'epoch': p.epoch, 'step': p.step, **result.as_dict()}) + '\n')

    def _write_model_files(self, result: Optional[EvalResult], improved: bool, last_loss: Optional[float]) -> None:
        """Consolidated fp32 weights (collective) into the self-describing files that launch/evaluate.py reads."""
        state = consolidated_state_dict(self.engine, self.model, self.run.batch.zero_stage)
        if not self.run.ctx.is_main:
            return
        cfg, task, p = self.cfg, self.cfg.task, self.progress
        extra = {
            'epoch': p.epoch,
            'step': p.step,
            'metrics': result.as_dict() if result else None,
            'pretrained': task.pretrained,
        }
        if _is_probe(cfg):
            extra['pool'] = task.pool
        run_dir = self.run.run_dir
        extra['run'] = run_facts(cfg.to_dict(), p.step, p.epoch, last_loss, run_dir, None)
        kw = dict(
            kind=task.section, model_cfg=cfg.model, num_classes=task.num_classes, img_size=_img_size(cfg), extra=extra
        )
        # the folder's card is about its best model, or its last while there is no best
        save_classifier_file(run_dir / LAST, state, card=not improved and not (run_dir / BEST).is_file(), **kw)
        if improved:
            save_classifier_file(run_dir / BEST, state, card=True, **kw)


def load_checkpoint(cfg: TaskConfig, run: RunStart, engine, model, tag: Optional[str], steps_per_epoch: int):
    """Collective: checkpoint `tag` into the engine, this rank's random streams reseeded for its step; returns its
    progress (at the start of a resumed run, and at a rollback), or None when `tag` is None."""

    def streams(state: Optional[dict], step: int) -> None:
        seed_classifier_rank(cfg.task.seed, run.ctx.rank, step)  # a classifier saves no streams of its own

    return restore(run, tag, engine, model, cfg.model, steps_per_epoch, streams)


def run_evaluation(engine, val_loader, dtype: torch.dtype) -> EvalResult:
    """Top-1/top-5 of the engine's model in eval mode (collective); training mode is restored afterwards."""
    engine.eval()
    try:
        val_loader.set_epoch(0)
        return evaluate(lambda img: engine(img.to(dtype)), val_loader, engine.device)
    finally:
        engine.train()


def train(
    cfg: TaskConfig, ds_path: str, resume: str = 'auto', trust_checkpoint: bool = False, take_over_lock: bool = False
) -> FinetuneResult:
    """Fine-tune (cfg.task a FinetuneConfig) or linearly probe (a LinearProbeConfig) with the DeepSpeed JSON at
    `ds_path`. `resume`: 'auto' (newest complete checkpoint of the run folder), 'none', or a tag.
    `trust_checkpoint`: read the pretrained weights and the resumed checkpoint without modelfiles/safe_load.py's checks;
    `take_over_lock`: take the run folder's lock from a run that is gone."""
    with start_run(
        ds_path,
        None,
        cfg.task,
        cfg.kernels,
        resume,
        check=lambda ds, b: _check_task(cfg, ds, b, ds_path),
        trust=trust_checkpoint,
        take_over_lock=take_over_lock,
    ) as run:
        return _train(cfg, run)


def _train(cfg: TaskConfig, run: RunStart) -> FinetuneResult:
    task, ctx, batch_cfg = cfg.task, run.ctx, run.batch
    loader, val_loader = _loaders(cfg, batch_cfg, ctx)
    schedule = make_schedule(task, batch_cfg.global_batch, batch_cfg.grad_accum, len(loader), run.ds_path)
    engine, model, opt_name = build_engine(cfg, run.ds, batch_cfg, ctx, schedule.peak_lr, run.trust)
    saved = load_checkpoint(cfg, run, engine, model, run.tag, schedule.steps_per_epoch)
    progress = ClassifierProgress(**(saved or {}))
    if saved is None:
        seed_classifier_rank(task.seed, ctx.rank, progress.step)
    if ctx.is_main:
        write_run_files(run.run_dir, cfg, run.ds, progress.step)
    logger = RunLogger(run.run_dir, schedule.total_steps, progress.step, ctx.is_main, task.progress_bar)
    logger.text(
        f'cmae_ds {task.section}: {cfg.model.size} at {_img_size(cfg)} px, {task.num_classes} classes, data '
        f'pipeline {loader.name}, optimizer {opt_name}, {batch_cfg.precision} ZeRO-{batch_cfg.zero_stage}, '
        f'global batch {batch_cfg.global_batch}, peak lr {schedule.peak_lr:.3g}, {schedule.total_steps} steps'
        + (f', resumed from {run.tag}' if run.tag else '')
    )
    ctask = ClassifierTask(cfg, run, engine, model, logger, progress, val_loader)
    checkpointer = Checkpointer(
        engine,
        run.ckpt_dir,
        task.save_every_steps,
        task.keep_last,
        ctx.is_main,
        client_state=ctask.client_state,
        at_epoch_end=True,
    )
    metrics = StepMetrics(engine.device, ctask.loss_keys, task.log_every_steps, ctx.world_size, run.ckpt_dir)
    loop = Loop(engine, schedule, progress, batch_cfg.grad_accum, task.max_steps, metrics, checkpointer, logger, run)
    try:
        loop.run(ctask, loader)
    finally:
        logger.close()
    best, last = run.run_dir / BEST, run.run_dir / LAST  # written by this invocation or the one it resumed
    return FinetuneResult(
        run.run_dir,
        progress.step,
        metrics.last_loss,
        ctask.evals,
        progress.best_top1,
        best if best.is_file() else None,
        last if last.is_file() else None,
    )
