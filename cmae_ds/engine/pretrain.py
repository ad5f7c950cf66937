"""CMAE pretraining under DeepSpeed: one explicit loop, `train()` -> `train_step()`.

Per micro-batch: forward, `engine.backward`, `engine.step` (DeepSpeed decides whether this micro-step is an
accumulation boundary). At each boundary the target branch takes its momentum step and the next learning rate is set.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..config import Config
from ..data import build_pretrain_loader
from ..ds_config import ResolvedBatch, check_precision_supported, load_ds_config, validate
from ..models import CMAE
from ..schedules import momentum_at
from . import checkpointing
from .common import (Meter, NonFiniteLoss, check_finite,  # noqa: F401 (NonFiniteLoss: part of this module's API)
                     consolidated_state_dict, dtype_of, due, grad_norm,
                     loss_scale, make_schedule, resume_tag, set_lr, write_run_files)
from .dist import DistContext, setup_distributed
from .logger import RunLogger
from .optim import build_optimizer, param_groups
from .output_dir import write_atomically


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint's client state."""
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already trained on
    step: int = 0  # optimizer steps taken


def momentum_at_step(cfg: Config, schedule, step: int) -> float:
    return momentum_at(step, total_steps=schedule.total_steps, m_base=cfg.train.momentum_base,
                       m_end=cfg.train.momentum_end)


def momentum_step(model: CMAE, m: float, zero_stage: int) -> None:
    """EMA of the target towards the online weights. ZeRO-3 partitions the online parameters, so they are
    gathered (all at once, one collective) for the duration of the update."""
    if model.target is None:
        return
    if zero_stage == 3:
        import deepspeed
        _, sources = model.ema_pairs()
        with deepspeed.zero.GatheredParameters(sources, modifier_rank=None):
            model.momentum_update(m)
    else:
        model.momentum_update(m)


def train_step(engine, batch: dict, dtype: torch.dtype, mask_gen: Optional[torch.Generator] = None) -> dict:
    """One micro-step. Returns the model's output dict (losses still on the device)."""
    img = batch['img'].to(engine.device, dtype=dtype, non_blocking=True)
    img_target = batch['img_target'].to(engine.device, dtype=dtype, non_blocking=True)
    out = engine(img, img_target, generator=mask_gen)
    engine.backward(out['loss'])
    engine.step()
    return out


def _client_state(cfg: Config, progress: Progress) -> dict:
    return {'progress': asdict(progress), 'config': cfg.to_dict()}


def _rank_state(mask_gen: torch.Generator) -> dict:
    return {'rng': checkpointing.rng_state(), 'mask_rng': mask_gen.get_state()}


def _restore_rank_state(cfg: Config, ctx: DistContext, ckpt_dir: Path, tag: str, progress: Progress,
                        mask_gen: torch.Generator) -> None:
    """RNG streams of this rank. A resume on more ranks than saved reseeds the new ranks from (seed, rank, step):
    the run continues correctly, only not bit-for-bit as an uninterrupted one would."""
    state = checkpointing.load_rank_state(ckpt_dir, tag, ctx.rank)
    if state is None:
        torch.manual_seed(cfg.train.seed * 1000 + ctx.rank + 7919 * progress.step)
        mask_gen.manual_seed(cfg.train.seed * 1000 + ctx.rank + 1 + 7919 * progress.step)
        return
    checkpointing.set_rng_state(state['rng'])
    mask_gen.set_state(state['mask_rng'])


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Optional[Path]
    model_file: Optional[Path]
    steps: int
    last_loss: Optional[float]
    first_loss: Optional[float]


def build_engine(cfg: Config, ds: dict, batch_cfg: ResolvedBatch, ctx: DistContext, peak_lr: float):
    """CMAE wrapped by DeepSpeed with the project's AdamW groups. Returns (engine, model, optimizer name).

    Every rank builds the model from the same seed: DeepSpeed broadcasts the online weights from rank 0, but the
    target branch is outside its reach and must start identical everywhere by construction.
    """
    import deepspeed
    torch.manual_seed(cfg.train.seed)
    model = CMAE(cfg.model)
    optimizer, opt_name = build_optimizer(param_groups(model, cfg.train.weight_decay), lr=peak_lr,
                                          betas=cfg.train.betas, backend=cfg.train.optimizer, device=ctx.device,
                                          offload=batch_cfg.offload_optimizer)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    model.to(engine.device)
    if batch_cfg.zero_stage != 3:  # ZeRO-3 partitions the online weights: momentum_step gathers them instead
        model.enable_flat_ema()
    return engine, model, opt_name


def mask_generator(cfg: Config, ctx: DistContext) -> torch.Generator:
    """The masks' own random stream: different per rank, saved in checkpoints, and untouched by anything else
    that draws from the global RNG (a DataLoader draws a seed from it whenever an iterator starts)."""
    return torch.Generator(device=ctx.device).manual_seed(cfg.train.seed * 1000 + ctx.rank + 1)


def train(cfg: Config, ds_path: str, resume: str = 'auto', observer=None) -> RunResult:
    """Pretrain CMAE with the DeepSpeed JSON at `ds_path`; see the README for the run folder layout.

    `observer(step, engine, model)`, if given, is called on every rank at start and after each optimizer step's
    momentum update (tests use it to follow the weights; monitors to evaluate).
    """
    ds = load_ds_config(ds_path)
    ctx = setup_distributed()
    batch_cfg = validate(ds, cfg, ctx.world_size, path=ds_path)
    check_precision_supported(batch_cfg, ds_path)
    run_dir = Path(cfg.train.output_dir)
    ckpt_dir = run_dir / 'checkpoints'
    tag = resume_tag(resume, ckpt_dir)
    loader = build_pretrain_loader(cfg.data, img_size=cfg.model.img_size, batch_size=batch_cfg.micro_batch,
                                   rank=ctx.rank, world_size=ctx.world_size, seed=cfg.train.seed,
                                   device=ctx.device, drop_last=True,
                                   hw_decoder_load=cfg.data.hw_decoder_load)
    schedule = make_schedule(cfg.train, batch_cfg, len(loader), ds_path)
    engine, model, opt_name = build_engine(cfg, ds, batch_cfg, ctx, schedule.peak_lr)
    progress, mask_gen = Progress(), mask_generator(cfg, ctx)
    if tag is not None:
        progress = Progress(**checkpointing.load(engine, ckpt_dir, tag)['progress'])
        _restore_rank_state(cfg, ctx, ckpt_dir, tag, progress, mask_gen)
    if ctx.is_main:
        write_run_files(run_dir, cfg, ds, progress.step)
    logger = RunLogger(run_dir, schedule.total_steps, progress.step, ctx.is_main, cfg.train.progress_bar)
    logger.text(f'cmae_ds: {cfg.model.mode} {cfg.model.size}, data pipeline {loader.name}, optimizer {opt_name}, '
                f'{batch_cfg.precision} ZeRO-{batch_cfg.zero_stage}, global batch {batch_cfg.global_batch}, '
                f'peak lr {schedule.peak_lr:.3g}, {schedule.total_steps} steps'
                + (f', resumed from {tag}' if tag else ''))
    if observer is not None:
        observer(progress.step, engine, model)
    try:
        return _loop(cfg, ctx, engine, model, loader, schedule, batch_cfg, progress, logger, ckpt_dir, observer,
                     mask_gen)
    finally:
        logger.close()


def _loop(cfg, ctx: DistContext, engine, model, loader, schedule, batch_cfg, progress, logger, ckpt_dir,
          observer, mask_gen):
    dtype = dtype_of(batch_cfg)
    last_step = schedule.total_steps if cfg.train.max_steps <= 0 else min(schedule.total_steps,
                                                                          progress.step + cfg.train.max_steps)
    usable = schedule.steps_per_epoch * batch_cfg.grad_accum  # a partial accumulation at an epoch's end is dropped
    watch = Watch(torch.zeros((), dtype=torch.bool, device=engine.device), Meter(), mask_gen)
    set_lr(engine.optimizer, schedule.lr(progress.step))
    while progress.step < last_step:
        loader.set_epoch(progress.epoch)
        if progress.batch_in_epoch:
            loader.skip_batches(progress.batch_in_epoch)
        it = iter(loader)
        while progress.step < last_step:
            t0 = time.perf_counter()
            batch = next(it)
            watch.meter.wait += time.perf_counter() - t0
            boundary = engine.is_gradient_accumulation_boundary()
            out = train_step(engine, batch, dtype, mask_gen)
            watch.accumulate(out)
            watch.meter.images += batch['img'].shape[0]
            progress.batch_in_epoch += 1
            epoch_done = progress.batch_in_epoch >= usable
            if epoch_done:
                progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
            if boundary:
                progress.step += 1
                _after_step(cfg, ctx, engine, model, schedule, batch_cfg, progress, logger, ckpt_dir, batch, out,
                            watch, final=progress.step == last_step)
                if observer is not None:
                    observer(progress.step, engine, model)
            if epoch_done:
                break
    model_file = _save_model_file(engine, model, batch_cfg, ckpt_dir.parent, ctx.is_main)
    return RunResult(ckpt_dir.parent, watch.saved, model_file, progress.step, watch.last_loss, watch.first_loss)


@dataclass
class Watch:
    """What the loop carries between steps: the device-side non-finite flag (read only at log and save steps,
    so no per-step host sync), throughput meter, losses seen at log steps, the last checkpoint written."""
    nonfinite: torch.Tensor
    meter: Meter
    mask_gen: torch.Generator
    first_loss: Optional[float] = None
    last_loss: Optional[float] = None
    saved: Optional[Path] = None
    sums: dict = field(default_factory=dict)
    count: int = 0

    def accumulate(self, out: dict) -> None:
        """Device-side running sums of the losses since the last log step (logged as means: a single batch of a
        small run is too noisy to show the trend)."""
        self.nonfinite |= ~torch.isfinite(out['loss'].detach())
        for key in ('loss', 'loss_rec', 'loss_con'):
            if key in out:
                value = out[key].detach().float()
                self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1

    def means(self) -> dict:
        values = {k: float(v) / max(self.count, 1) for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return values


def _after_step(cfg, ctx, engine, model, schedule, batch_cfg, progress, logger, ckpt_dir, batch, out, watch, final):
    """Everything that happens once per optimizer step: EMA, next lr, logging, images, checkpoints."""
    step = progress.step
    momentum_step(model, momentum_at_step(cfg, schedule, step), batch_cfg.zero_stage)
    set_lr(engine.optimizer, schedule.lr(step))
    logger.advance()
    if due(step, cfg.train.log_every_steps) or final:
        check_finite(watch.nonfinite, step, ckpt_dir)
        watch.last_loss = _log(cfg, engine, schedule, progress, watch.means(), watch.meter, logger, ctx.world_size)
        watch.first_loss = watch.last_loss if watch.first_loss is None else watch.first_loss
        watch.meter.reset()
    if due(step, cfg.train.image_every_steps) or final:
        logger.reconstruction(step, batch['img'], batch.get('img_target'), out['pred_pixel'], out['mask'],
                              cfg.model.patch_size)
    if due(step, cfg.train.save_every_steps) or final:
        check_finite(watch.nonfinite, step, ckpt_dir)
        watch.saved = checkpointing.save(engine, ckpt_dir, step, _client_state(cfg, progress),
                                         cfg.train.keep_last, ctx.is_main, rank_state=_rank_state(watch.mask_gen))


def _log(cfg, engine, schedule, progress, losses: dict, meter, logger, world_size) -> float:
    """Logs mean losses since the last log step, lr, momentum, grad norm, loss scale, images/s, data wait."""
    values = dict(losses, lr=schedule.lr(progress.step), momentum=momentum_at_step(cfg, schedule, progress.step),
                  epoch=progress.epoch + progress.batch_in_epoch / max(1, schedule.steps_per_epoch))
    for name, value in (('grad_norm', grad_norm(engine)), ('loss_scale', loss_scale(engine))):
        if value is not None:
            values[name] = value
    values.update(meter.values(world_size))
    logger.scalars(progress.step, values)
    return values['loss']


def _save_model_file(engine, model, batch_cfg, run_dir: Path, is_main: bool) -> Optional[Path]:
    """model.pt: the full fp32 model (online and target) for fine-tuning, extraction and export."""
    state = consolidated_state_dict(engine, model, batch_cfg.zero_stage)
    if not is_main:
        return None
    payload = {'state_dict': state, 'model_config': asdict(model.cfg)}
    return write_atomically(run_dir / 'model.pt', lambda tmp: torch.save(payload, tmp), 'model file')
