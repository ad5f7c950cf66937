"""CMAE pretraining under DeepSpeed: `train()` builds the run, `engine.loop` runs it, `PretrainTask` is what is
particular to pretraining.

Per micro-batch: forward, `engine.backward`, `engine.step` (DeepSpeed decides whether this micro-step is an
accumulation boundary). After each optimizer step the target branch takes its momentum step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from ..config import Config
from ..config.ds_config import ResolvedBatch, compute_dtype
from ..data import build_pretrain_loader
from ..engine.checkpoints import store
from ..engine.checkpoints.model_state import save_model_file
from ..engine.checkpoints.resume import restore
from ..engine.checkpoints.store import Checkpointer
from ..engine.compile import apply_compile
from ..engine.dist import DistContext
from ..engine.logger import RunLogger
from ..engine.loop import Loop, Progress, RunStart, start_run
from ..engine.metrics import StepMetrics, due
from ..engine.optim import build_optimizer, param_groups, undo_initial_step
from ..engine.run_files import write_run_files
from ..engine.schedules import make_schedule, momentum_at
from ..errors import NonFiniteLoss  # noqa: F401 (part of this module's API)
from ..modelfiles.model_card import last_knn, run_facts
from ..models import CMAE
from ..seeds import mask_seed, model_seed, resumed_rank_seeds


def momentum_at_step(cfg: Config, schedule, step: int) -> float:
    return momentum_at(
        step, total_steps=schedule.total_steps, m_base=cfg.train.momentum_base, m_end=cfg.train.momentum_end
    )


def momentum_step(model: CMAE, m: float, zero_stage: int) -> None:
    """EMA of the target towards the online weights: their fp32 master where the model took it (every ZeRO stage
    without offload), else the weights, which ZeRO-3 partitions: they are then gathered (all at once, one
    collective) for the duration of the update."""
    if model.target is None:
        return
    if zero_stage == 3 and not model.ema_from_master:
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
    # Drawn outside the forward: a torch.Generator cannot enter a compiled graph; the same draw as inside.
    mask = engine.module.random_mask(img.shape[0], img.device, mask_gen)
    out = engine(img, img_target, mask=mask)
    engine.backward(out['loss'])
    engine.step()
    return out


def rank_streams(cfg: Config, rank: int, mask_gen: torch.Generator):
    """How a resume sets this rank's random streams: from the rank's own saved state, or, on a rank the checkpoint
    has none for (a resume on more ranks than saved), reseeded from (seed, rank, step): the run continues correctly,
    only not bit-for-bit as an uninterrupted one would."""

    def streams(state: Optional[dict], step: int) -> None:
        if state is None:
            torch_seed, mask = resumed_rank_seeds(cfg.train.seed, rank, step)
            torch.manual_seed(torch_seed)
            mask_gen.manual_seed(mask)
            return
        store.set_rng_state(state['rng'])
        mask_gen.set_state(state['mask_rng'])

    return streams


def load_checkpoint(cfg: Config, run: RunStart, engine, model, mask_gen, tag: Optional[str], steps_per_epoch: int):
    """Collective: checkpoint `tag` into the engine and this rank's random streams; returns its progress (at the
    start of a resumed run, and at a rollback), or None when `tag` is None."""
    streams = rank_streams(cfg, run.ctx.rank, mask_gen)
    return restore(run, tag, engine, model, cfg.model, steps_per_epoch, streams)


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Optional[Path]
    model_file: Optional[Path]
    steps: int
    last_loss: Optional[float]
    first_loss: Optional[float]


def build_engine(cfg: Config, ds: dict, batch_cfg: ResolvedBatch, ctx: DistContext, peak_lr: float):
    """CMAE wrapped by DeepSpeed with the project's AdamW groups, its blocks compiled as model.compile says.
    Returns (engine, model, optimizer name); `model.compiled` is the CompileState.

    Every rank builds the model from the same seed: DeepSpeed broadcasts the online weights from rank 0, but the
    target branch is outside its reach and must start identical everywhere by construction.
    """
    import deepspeed

    torch.manual_seed(model_seed(cfg.train.seed))
    model = CMAE(cfg.model)
    compiled = apply_compile(model, cfg.model.compile, ctx.device, batch_cfg.zero_stage)
    optimizer, opt_name = build_optimizer(
        param_groups(model, cfg.train.weight_decay, cfg.train.no_decay),
        lr=peak_lr,
        betas=cfg.train.betas,
        backend=cfg.train.optimizer,
        device=ctx.device,
        offload=batch_cfg.offload_optimizer,
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    undo_initial_step(engine)
    model.to(engine.device)
    # ZeRO-3's online weights are partitions: without its master EMA momentum_step gathers them
    if not model.enable_master_ema(engine.optimizer) and batch_cfg.zero_stage != 3:
        model.enable_flat_ema()
    model.compiled = compiled
    return engine, model, opt_name


def mask_generator(cfg: Config, ctx: DistContext) -> torch.Generator:
    """The masks' own random stream: different per rank, saved in checkpoints, and untouched by anything else
    that draws from the global RNG (a DataLoader draws a seed from it whenever an iterator starts)."""
    return torch.Generator(device=ctx.device).manual_seed(mask_seed(cfg.train.seed, ctx.rank))


class PretrainTask:
    """What is particular to pretraining: the CMAE micro-step, the EMA after each optimizer step, the momentum
    in the logs, reconstruction images, the mask stream in checkpoints and model.safetensors at the end."""

    loss_keys = ('loss', 'loss_rec', 'loss_con')

    def __init__(
        self, cfg: Config, run: RunStart, engine, model: CMAE, schedule, logger: RunLogger, mask_gen: torch.Generator
    ):
        self.cfg, self.run, self.engine, self.model = cfg, run, engine, model
        self.schedule, self.logger, self.mask_gen = schedule, logger, mask_gen
        self.dtype = compute_dtype(run.batch)

    def train_step(self, batch: dict) -> dict:
        return train_step(self.engine, batch, self.dtype, self.mask_gen)

    def momentum(self, step: int) -> float:
        """The momentum of the EMA that follows optimizer step `step` (0-based). The official MomentumUpdateHook
        reads runner.iter in before_train_iter, before mmengine raises it, so step k's EMA uses m(k), not m(k + 1)."""
        return momentum_at_step(self.cfg, self.schedule, step)

    def after_step(self, loop: Loop, batch: dict, out: dict, final: bool) -> None:
        step = loop.progress.step
        momentum_step(self.model, self.momentum(step - 1), self.run.batch.zero_stage)
        if due(step, self.cfg.train.image_every_steps) or final:
            self.logger.reconstruction(
                step, batch['img'], batch.get('img_target'), out['pred_pixel'], out['mask'], self.cfg.model.patch_size
            )

    def log_values(self, step: int) -> dict:
        return {'momentum': self.momentum(step - 1)}  # the one step `step`'s EMA applied

    def end_of_epoch(self, loop: Loop, final: bool) -> None:
        pass

    def load_checkpoint(self, tag: str, steps_per_epoch: int) -> dict:
        return load_checkpoint(self.cfg, self.run, self.engine, self.model, self.mask_gen, tag, steps_per_epoch)

    def client_state(self, progress: Progress) -> dict:
        return {'progress': asdict(progress), 'config': self.cfg.to_dict()}

    def rank_state(self) -> dict:
        return {'rng': store.rng_state(), 'mask_rng': self.mask_gen.get_state()}


def train(
    cfg: Config,
    ds_path: str,
    resume: str = 'auto',
    observer=None,
    trust_checkpoint: bool = False,
    take_over_lock: bool = False,
) -> RunResult:
    """Pretrain CMAE with the DeepSpeed JSON at `ds_path`; the run folder layout is in docs/pretrain.md.

    `observer(step, engine, model)`, if given, is called on every rank at start and after each optimizer step's
    momentum update (tests use it to follow the weights; monitors to evaluate). `trust_checkpoint`: resume without
    the checks of cmae_ds.modelfiles.safe_load; `take_over_lock`: take the run folder's lock from a run that is gone.
    """
    with start_run(
        ds_path, cfg, cfg.train, cfg.kernels, resume, trust=trust_checkpoint, take_over_lock=take_over_lock
    ) as run:
        return _train(cfg, run, observer)


def pretrain_loader(cfg: Config, batch_cfg: ResolvedBatch, ctx: DistContext):
    """This rank's loader of (online, target) micro-batches, as the run and the benchmark read them."""
    return build_pretrain_loader(
        cfg.data,
        img_size=cfg.model.img_size,
        batch_size=batch_cfg.micro_batch,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=cfg.train.seed,
        device=ctx.device,
        drop_last=True,
    )


def _train(cfg: Config, run: RunStart, observer) -> RunResult:
    ctx, batch_cfg = run.ctx, run.batch
    loader = pretrain_loader(cfg, batch_cfg, ctx)
    schedule = make_schedule(cfg.train, batch_cfg.global_batch, batch_cfg.grad_accum, len(loader), run.ds_path)
    engine, model, opt_name = build_engine(cfg, run.ds, batch_cfg, ctx, schedule.peak_lr)
    mask_gen = mask_generator(cfg, ctx)
    progress = Progress(**(load_checkpoint(cfg, run, engine, model, mask_gen, run.tag, schedule.steps_per_epoch) or {}))
    if ctx.is_main:
        write_run_files(run.run_dir, cfg, run.ds, progress.step)
    logger = RunLogger(run.run_dir, schedule.total_steps, progress.step, ctx.is_main, cfg.train.progress_bar)
    logger.text(
        f'cmae_ds: {cfg.model.mode} {cfg.model.size}, data pipeline {loader.name}, optimizer {opt_name}, '
        f'{batch_cfg.precision} ZeRO-{batch_cfg.zero_stage}, global batch {batch_cfg.global_batch}, '
        f'peak lr {schedule.peak_lr:.3g}, {schedule.total_steps} steps'
        + (f', resumed from {run.tag}' if run.tag else '')
    )
    task = PretrainTask(cfg, run, engine, model, schedule, logger, mask_gen)
    t = cfg.train
    checkpointer = Checkpointer(
        engine,
        run.ckpt_dir,
        t.save_every_steps,
        t.keep_last,
        ctx.is_main,
        client_state=lambda: task.client_state(progress),
        rank_state=task.rank_state,
    )
    metrics = StepMetrics(engine.device, task.loss_keys, t.log_every_steps, ctx.world_size, run.ckpt_dir)
    loop = Loop(
        engine,
        schedule,
        progress,
        batch_cfg.grad_accum,
        t.max_steps,
        metrics,
        checkpointer,
        logger,
        run,
        observer=None if observer is None else lambda step: observer(step, engine, model),
    )
    if observer is not None:
        observer(progress.step, engine, model)
    try:
        loop.run(task, loader)
        facts = None
        if ctx.is_main:
            epochs = progress.step / schedule.steps_per_epoch
            knn = last_knn(run.run_dir)
            facts = run_facts(cfg.to_dict(), progress.step, epochs, metrics.last_loss, run.run_dir, knn)
        model_file = save_model_file(engine, model, batch_cfg.zero_stage, run.run_dir, ctx.is_main, facts)
    finally:
        logger.close()
    return RunResult(
        run.run_dir, checkpointer.last_saved, model_file, progress.step, metrics.last_loss, metrics.first_loss
    )
