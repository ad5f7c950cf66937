"""The one training loop of pretraining, fine-tuning and linear probing.

The loop owns epochs, accumulation boundaries and the position inside an epoch (so a resume skips exactly the
micro-batches already trained on). At each optimizer step it asks the components that own the answers: the
`RollbackGuard` (diverged? then roll back; where does the data go on?), the task (its own after-step work: the EMA,
images, evaluation), `StepMetrics` (log now?), the `Checkpointer` (save now?).
A task supplies `train_step(batch) -> dict` (one micro-step, 'loss' on the device), `after_step(loop, batch, out,
final)`, `log_values(step) -> dict`, `end_of_epoch(loop, final)` and `load_checkpoint(tag, steps_per_epoch) -> dict`
(a rollback's reload: the progress saved with the checkpoint, through checkpoints.resume.restore as at the start).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol

from ..config import KernelConfig
from ..config.ds_config import ResolvedBatch, check_precision_supported, load_ds_config, validate
from ..errors import Preempted
from ..kernels import configure as configure_kernels
from ..storage.atomic_write import atomic_write_text
from . import startup, torch_globals
from .checkpoints.resume import choose
from .checkpoints.store import Checkpointer
from .checkpoints.store import tag_for as checkpoint_tag
from .dist import DistContext, setup_distributed
from .guards import run_lock
from .guards.preemption import StopRequests
from .guards.rollback import RollbackGuard
from .guards.skips import Layout
from .guards.watchdog import StepWatchdog
from .logger import RunLogger
from .metrics import StepMetrics
from .optim import set_lr
from .schedules import Schedule

PREEMPTED = 'preempted.json'


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint's client state."""

    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already trained on
    step: int = 0  # optimizer steps taken
    data_ahead: int = 0  # images of the epochs' orders skipped after rollbacks: the data runs ahead of the steps
    rollbacks: dict = field(default_factory=dict)  # guards.rollback's events and detector history


class Task(Protocol):
    def train_step(self, batch: dict) -> dict: ...

    def after_step(self, loop: 'Loop', batch: dict, out: dict, final: bool) -> None: ...

    def log_values(self, step: int) -> dict: ...

    def end_of_epoch(self, loop: 'Loop', final: bool) -> None: ...

    def load_checkpoint(self, tag: str, steps_per_epoch: int) -> dict: ...


@dataclass
class RunStart:
    """What every task knows before it builds its data and model: the DeepSpeed JSON checked against the config
    and the world size, the process group, the run folder, the checkpoint to resume from, and the stop requests
    (signals, launcher death) and step watchdog that guard the run."""

    ds: dict
    ds_path: str
    ctx: DistContext
    batch: ResolvedBatch
    run_dir: Path
    tag: Optional[str]
    stop: StopRequests
    watchdog: StepWatchdog
    trust: bool = False
    """Read checkpoint files without cmae_ds.modelfiles.safe_load's checks (--trust-checkpoint)."""
    section: object = None
    """The task's section: its RunGuard fields (rollbacks)."""

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / 'checkpoints'


@contextmanager
def start_run(
    ds_path: str,
    cfg,
    section,
    kernels: KernelConfig,
    resume: str,
    check: Optional[Callable[[dict, ResolvedBatch], None]] = None,
    trust: bool = False,
    take_over_lock: bool = False,
) -> Iterator[RunStart]:
    """`cfg`: the pretraining Config to validate against the JSON, or None (classification tasks); `section`: the
    task's section (output_dir and the RunGuard fields); `kernels`: the fusion switches of this process;
    `check(ds, batch)`: the task's own checks of the JSON; `trust`: skip the checks of the checkpoint files (the
    resumed tag is otherwise scanned here, before anything is built); `take_over_lock`: take the run folder's lock
    from a run that is gone. Before anything is built, the run folder must take a write and have room for a
    checkpoint, and rank 0 holds its lock (run_lock) until the run ends. Signals are caught from here on, restored
    on leaving, as are the torch functions DeepSpeed replaces (engine/torch_globals.py)."""
    stop = StopRequests().install()
    startup.begin()  # until the first step, a stop signal ends the process at once
    configure_kernels(**kernels.switches())
    try:
        with (
            torch_globals.restored(),
            run_lock.guard(section.output_dir, take_over=take_over_lock, key=f'{section.section}.output_dir'),
        ):
            yield from _started(ds_path, cfg, section, resume, check, trust, stop)
    finally:
        startup.end()
        stop.restore()


def _started(ds_path, cfg, section, resume, check, trust, stop) -> Iterator[RunStart]:
    watchdog = None
    try:
        ds = load_ds_config(ds_path)
        ctx = setup_distributed(timeout_s=section.collective_timeout_s)
        stop.attach(ctx.world_size)
        batch = validate(ds, cfg, ctx.world_size, path=ds_path)
        check_precision_supported(batch, ds_path)
        if check is not None:
            check(ds, batch)
        run_dir = Path(section.output_dir)
        tag = choose(resume, run_dir / 'checkpoints', trust)
        if ctx.is_main:
            (run_dir / PREEMPTED).unlink(missing_ok=True)
        watchdog = StepWatchdog(run_dir, ctx.rank, section.stall_factor, section.stall_min_s).start()
        yield RunStart(ds, ds_path, ctx, batch, run_dir, tag, stop, watchdog, trust, section)
    finally:
        if watchdog is not None:
            watchdog.stop()


@dataclass
class Loop:
    engine: object
    schedule: Schedule
    progress: Progress
    grad_accum: int
    max_steps: int
    metrics: StepMetrics
    checkpointer: Checkpointer
    logger: RunLogger
    start: RunStart
    observer: Optional[Callable[[int], None]] = None

    def __post_init__(self):
        total = self.schedule.total_steps
        self.last_step = total if self.max_steps <= 0 else min(total, self.progress.step + self.max_steps)
        # A partial accumulation at an epoch's end is dropped: every optimizer step sees a full global batch.
        self.usable = self.schedule.steps_per_epoch * self.grad_accum
        layout = Layout(self.start.batch.global_batch, self.schedule.steps_per_epoch)
        self.guard = RollbackGuard(
            self.start.section, self.start, self.engine, self.progress, layout, self.grad_accum, self.logger
        )

    def run(self, task: Task, loader) -> None:
        p, last_step, usable = self.progress, self.last_step, self.usable
        startup.end()  # from here a stop signal is a request for a checkpoint at the next step
        self.guard.plan = getattr(loader, 'plan', None)
        self._set_lr(p.step)
        while p.step < last_step:
            self.guard.skip()
            loader.set_epoch(p.epoch)
            if p.batch_in_epoch:
                loader.skip_batches(p.batch_in_epoch)
            for batch in self.metrics.timed(loader):
                boundary = self.engine.is_gradient_accumulation_boundary()
                out = task.train_step(batch)
                self.metrics.accumulate(out, batch['img'].shape[0])
                self.guard.accumulate(out)
                p.batch_in_epoch += 1
                epoch_done = p.batch_in_epoch >= usable
                if epoch_done:
                    p.epoch, p.batch_in_epoch = p.epoch + 1, 0
                if boundary:
                    p.step += 1
                    if self._after_step(task, batch, out, epoch_done, final=p.step >= last_step):
                        break
                if epoch_done or p.step >= last_step or (boundary and self.guard.ahead()):
                    break

    def _set_lr(self, step: int) -> None:
        set_lr(self.engine.optimizer, self.schedule, step, self.guard.lr_factor(step))

    def _after_step(self, task: Task, batch: dict, out: dict, epoch_done: bool, final: bool) -> bool:
        """True when the step was rolled back: the progress moved and the data starts elsewhere."""
        step, watchdog = self.progress.step, self.start.watchdog
        watchdog.beat(step)
        # A step that is saved or logged (both read the loss) is judged at once, the others one step late.
        now = self.checkpointer.due(step, final=final, epoch_end=epoch_done) or self.metrics.due(step, final)
        event = self.guard.check(step, now=now)  # also agrees on the stop requests: one collective per step
        if event is not None:
            with watchdog.phase('rollback'):
                rolled_back = self.guard.roll_back(event, task)
            if rolled_back:
                self.metrics.discard()
                self._set_lr(self.progress.step)
                return True
        task.after_step(self, batch, out, final)
        self._set_lr(step)
        self.logger.advance()
        if self.metrics.due(step, final):
            self.metrics.check_finite(step)
            self.logger.scalars(step, self.metrics.collect(self.engine, self._log_values(task, step)))
        if epoch_done or final:
            with watchdog.phase('end of epoch'):
                task.end_of_epoch(self, final)
        if self.checkpointer.due(step, final=final, epoch_end=epoch_done):
            self._save(step)
        if self.observer is not None:
            with watchdog.phase('observer'):
                self.observer(step)
        if not final and self.start.stop.agreed():
            self._preempt(step)
        return False

    def _save(self, step: int) -> Path:
        self.metrics.check_finite(step)
        with self.start.watchdog.phase('checkpoint save'):
            return self.checkpointer.save(step)

    def _preempt(self, step: int) -> None:
        """Every rank agreed to stop: a complete checkpoint of this step (unless one was just written), a note in
        the run folder for requeue scripts, then Preempted."""
        saved = self.checkpointer.last_saved
        if saved is None or saved.name != checkpoint_tag(step):
            saved = self._save(step)
        origins = self.start.stop.origins()
        by_reason: dict[str, list[str]] = {}
        for rank, why in origins.items():
            by_reason.setdefault(why, []).append(str(rank))
        reason = '; '.join(f'{why} (rank {", ".join(r)})' for why, r in by_reason.items()) or self.start.stop.reason
        if self.start.ctx.is_main:
            note = {'step': step, 'reason': reason, 'ranks': origins, 'checkpoint': str(saved), 'time': time.time()}
            atomic_write_text(self.start.run_dir / PREEMPTED, json.dumps(note))
        raise Preempted(
            f'{reason}; stopped at step {step} with a complete checkpoint {saved}; run the same command '
            'again to resume from it'
        )

    def _log_values(self, task: Task, step: int) -> dict:
        p = self.progress
        return {
            'lr': self.schedule.lr(step - 1),  # the rate step `step` was taken with (the next one is set already)
            **task.log_values(step),
            'epoch': p.epoch + p.batch_in_epoch / max(1, self.usable),
        }
