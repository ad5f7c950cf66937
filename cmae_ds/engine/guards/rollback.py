"""Runs that heal themselves (docs/reliability.md): at each optimizer step every rank's loss, the gradient norm and a
non-finite flag are all-reduced on the CPU group the stop requests use, and the divergence detector judges the same
values on every rank, so all ranks reach the same verdict together. On one, the run rolls back in the process to the
newest complete checkpoint before the event, skips the data from that checkpoint's position up to the event plus
a margin, optionally scales the lr down for a while, and goes on; at most `max_rollbacks` times within
`rollback_window_steps`, past which it stops with exit code 3 and the events named.

A step's loss and gradient norm are judged one step late (guards.agreement): they travel to the host while the next
step runs, so the one read of each step never waits for the step in flight, and they share one all-reduce with the
stop requests. A step that is logged, saved or the run's last is judged at once (those read the loss anyway), so
no diverged weights are written.
The values are sent only with rollbacks on (`max_rollbacks` > 0).

The events and the detector's history live in the run's progress (saved in every checkpoint); `rollbacks.json` in
the run folder lists the events with the dataset indices skipped, and a resume from any checkpoint, also one older
than an event, reads the events of both, so no run reads a skipped range again.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ...errors import Diverged, NonFiniteLoss
from ...storage.atomic_write import atomic_write_text
from ..checkpoints import store
from ..checkpoints.verify import MARKER, check_tag
from ..dist import barrier, gather_objects
from .agreement import StepValues, agree
from .divergence import DivergenceDetector, SpikeRule, Verdict
from .lineage import Lineage
from .skips import Layout, dataset_indices, first_unskipped, ranges_between

RECORD = 'rollbacks.json'


@dataclass(frozen=True)
class Event:
    step: int
    verdict: Verdict
    ranks: list
    """Ranks whose own loss was non-finite (empty for a spike, which is judged on the mean over ranks)."""
    at: Optional[tuple] = None
    """(epoch, position) of the data right after the step: judged a step late, the run has moved on since."""

    def describe(self) -> str:
        seen = f' (seen on rank {", ".join(map(str, self.ranks))})' if self.ranks else ''
        return f'step {self.step}: {self.verdict.reason}{seen}'


def describe(record: dict) -> str:
    return f'step {record["step"]}: {record["reason"]}'


class RollbackGuard:
    """Asked by the loop: `accumulate` (each micro-step), `check` (each optimizer step: an agreed Event or None),
    `roll_back`, `skip` / `ahead` (where the next step's data starts), `lr_factor`."""

    def __init__(self, section, start, engine, progress, layout: Layout, grad_accum: int, logger):
        self.section, self.start, self.engine, self.progress = section, start, engine, progress
        self.layout, self.grad_accum, self.logger = layout, grad_accum, logger
        self.on = section is not None and section.max_rollbacks > 0
        self.plan = None  # the loader's ShardPlan: dataset indices of the skipped ranges, for the record
        state = progress.rollbacks
        state.setdefault('events', [])
        self.state = state
        window = section.spike_window_steps if section is not None else 1
        steps = section.spike_steps if section is not None else 1
        self.detector = DivergenceDetector(
            SpikeRule(section.spike_factor if self.on else 0.0, window, steps),
            SpikeRule(section.grad_spike_factor if self.on else 0.0, window, steps),
            state.setdefault('detector', {}),
        )
        self._loss: Optional[torch.Tensor] = None
        self._count = 0
        self._pending: list[StepValues] = []  # steps whose values are on their way to the host, judged one step late
        self._last_n = max((e['n'] for e in state['events']), default=0)
        if self.on:
            self._merge_recorded()
            self.lineage = self._lineage()

    @property
    def path(self) -> Path:
        return self.start.run_dir / RECORD

    def _merge_recorded(self) -> None:
        """Events in rollbacks.json that the resumed checkpoint predates (collective: rank 0 reads the file)."""
        recorded = read_record(self.path) if self.start.ctx.is_main else None
        recorded = gather_objects(recorded)[0] or []
        known = {e['n'] for e in self.state['events']}
        # only events that rolled back skip data; the others (a stop, a spike with nothing to return to) are history
        kept = [compact(e) for e in recorded if e['n'] not in known and e.get('checkpoint')]
        self.state['events'] = sorted(self.state['events'] + kept, key=lambda e: e['n'])
        self._last_n = max((e['n'] for e in [*recorded, *self.state['events']]), default=0)

    # --- detection ---------------------------------------------------------------------------------------------

    def accumulate(self, out: dict) -> None:
        if self.on:
            loss = out['loss'].detach().float()
            self._loss = loss if self._loss is None else self._loss + loss
            self._count += 1

    def check(self, step: int, now: bool = False) -> Optional[Event]:
        """The agreed verdict of the step before this one, and of this one too when `now` (a log, a save or the
        end follows: nothing diverged may be written); also agrees on the stop requests (guards.agreement). Collective:
        every rank calls it at every boundary."""
        if self.on and self._loss is not None:
            norm, overflow = self.engine.get_global_grad_norm(), _fp16_overflow(self.engine)
            self._pending.append(StepValues(step, self._loss, self._count, norm, overflow, self._position()))
            self._loss, self._count = None, 0
        judged = self._pending if now else self._pending[:-1]
        self._pending = self._pending[len(judged) :]
        world = self.start.ctx.world_size
        event = None
        for values, (local, reduced) in zip(judged, agree(judged, self.start.stop, world)):
            loss = math.nan if reduced[1] > 0 else reduced[0] / world
            verdict = self.detector.observe(values.step, loss, values.norm(reduced[2], world), values.overflow)
            if verdict is not None and event is None:
                ranks = [rank for rank, bad in enumerate(gather_objects(bool(local[1] > 0))) if bad]
                event = Event(values.step, verdict, ranks, values.at)
        return event

    def _position(self) -> tuple[int, int]:
        p = self.progress
        return p.epoch, p.batch_in_epoch * self.layout.global_batch // self.grad_accum

    # --- response ----------------------------------------------------------------------------------------------

    def roll_back(self, event: Event, task) -> bool:
        """Collective. Reload the newest complete checkpoint before the event into the engine and the progress,
        record the skipped data; False when a spike has no checkpoint before it (the run goes on, the event is
        recorded). Raises Diverged past the budget, NonFiniteLoss when a non-finite loss has nothing to return to."""
        p, s = self.progress, self.section
        at = event.at or self._position()
        self._last_n += 1
        record = {
            'n': self._last_n,
            'step': event.step,
            'first_step': event.verdict.first_step,
            'reason': event.verdict.reason,
            'ranks': event.ranks,
            'checkpoint': None,
        }
        recent = [e for e in self.state['events'] if e['step'] > event.step - s.rollback_window_steps]
        tag = self._target(event.verdict.first_step)
        if len(recent) >= s.max_rollbacks:
            self._point_to(tag)
            self._stop(record, recent, tag)
        if tag is None:
            if event.verdict.reason.startswith('non-finite'):
                self._stop(record, [], None, why='there is no complete checkpoint before it to roll back to')
            self._write(record, [])
            self._say(f'{event.describe()}; no complete checkpoint before step {event.verdict.first_step}: going on')
            return False
        self._drop_after(tag, event.verdict.first_step)
        loaded = task.load_checkpoint(tag, self.layout.steps_per_epoch)
        for key, value in loaded.items():
            if key != 'rollbacks':  # this run's events and history are newer than the checkpoint's
                setattr(p, key, value)
        start = (p.epoch, p.batch_in_epoch * self.layout.global_batch // self.grad_accum)
        end = (at[0], at[1] + s.skip_margin_steps * self.layout.global_batch)
        record.update(
            checkpoint=tag,
            checkpoint_step=p.step,
            skipped=ranges_between(start, end, self.layout),
            lr_factor=s.rollback_lr_factor,
            lr_until_step=p.step + s.rollback_lr_steps,
        )
        self.state['events'].append(compact(record))
        self.detector.state['loss_run'] = self.detector.state['norm_run'] = 0
        self._loss, self._count, self._pending = None, 0, []
        images = dataset_indices(self.plan, record['skipped']) if self.plan is not None and self._main else []
        self._write(record, images)
        skipped = sum(e - b for _, b, e in record['skipped'])
        self._say(
            f'{event.describe()}: rolled back to {tag} (step {p.step}), skipping {skipped} images '
            f'({_ranges_text(record["skipped"])}); event {record["n"]} of at most {s.max_rollbacks} in '
            f'{s.rollback_window_steps} steps'
        )
        if self.logger.enabled:
            self.logger.writer.add_scalar('rollback/events', len(self.state['events']), event.step)
            self.logger.writer.add_scalar('rollback/skipped_images', skipped, event.step)
        return True

    def _lineage(self) -> Lineage:
        """The checkpoints this run started with, as rank 0 read them (collective): every rank judges the same."""
        found = Lineage.at_start(self.start.ckpt_dir, self.start.tag) if self._main else None
        return gather_objects(found)[0]

    def _target(self, first_step: int) -> Optional[str]:
        """The newest checkpoint written before the event that verifies (collective): the resumed one and those
        before it, or one of this run's own saved before `first_step` (guards/lineage.py: write order, not tags)."""
        ckpt_dir = self.start.ckpt_dir
        for tag in reversed(self.lineage.before(first_step)):
            problem = check_tag(ckpt_dir, tag, self._say)
            if problem is None:
                return tag
            self._say(f'checkpoint {tag} is damaged ({problem}): not rolling back to it')
        return None

    def _drop_after(self, tag: str, first_step: int) -> None:
        """This run's checkpoints written at or after the event's first step hold the diverged weights: not resume
        points; the resumed one and every one before this run stay. `latest` names the one rolled back to (a crash
        from here on resumes from it). Collective."""
        ckpt_dir = self.start.ckpt_dir
        if self._main:
            for other in self.lineage.after(first_step):
                (ckpt_dir / other / MARKER).unlink(missing_ok=True)
                shutil.rmtree(ckpt_dir / other, ignore_errors=True)
        self._point_to(tag)

    def _point_to(self, tag: Optional[str]) -> None:
        """`latest` names the last good checkpoint (collective)."""
        if self._main and tag is not None:
            atomic_write_text(self.start.ckpt_dir / store.POINTER, tag)
        barrier()

    def _stop(self, record: dict, recent: list, tag: Optional[str], why: str = '') -> None:
        self._write(record, [])
        last = f'; last good checkpoint: {self.start.ckpt_dir / tag}' if tag else ''
        if not why:
            s = self.section
            events = '; '.join(describe(e) for e in [*recent, record])
            raise Diverged(
                f'{len(recent) + 1} divergence events within {s.rollback_window_steps} steps, more than '
                f'max_rollbacks {s.max_rollbacks} allows ({events}){last}; see {self.path}'
            )
        raise NonFiniteLoss(f'{describe(record)} at step {record["step"]}; {why}{last}')

    def _write(self, record: dict, images: list) -> None:
        if self._main:
            entries = [e for e in read_record(self.path) if e['n'] != record['n']]
            entry = {**record, 'skipped_images': images, 'time': time.time()}
            lines = [json.dumps(e) for e in sorted([*entries, entry], key=lambda e: e['n'])]
            atomic_write_text(self.path, '[\n' + ',\n'.join(lines) + '\n]\n')  # one event a line

    def _say(self, message: str) -> None:
        self.logger.text(f'cmae_ds: rollback: {message}')

    @property
    def _main(self) -> bool:
        return self.start.ctx.is_main

    # --- where the data goes on, and the lr ----------------------------------------------------------------------

    def _first_unskipped(self) -> tuple[int, int]:
        p = self.progress
        return first_unskipped(self._ranges(), p.epoch, p.batch_in_epoch // self.grad_accum, self.layout)

    def _ranges(self) -> list:
        return [r for e in self.state['events'] for r in e.get('skipped', [])]

    def ahead(self) -> bool:
        """The next optimizer step's data lies in a skipped range."""
        p = self.progress
        return bool(self.state['events']) and self._first_unskipped() != (p.epoch, p.batch_in_epoch // self.grad_accum)

    def skip(self) -> None:
        """Move the progress past skipped data; `data_ahead` keeps how far the data runs ahead of the steps."""
        if not self.ahead():
            return
        p, size, g = self.progress, self.layout.epoch_images, self.layout.global_batch
        epoch, step_in_epoch = self._first_unskipped()
        before = p.epoch * size + p.batch_in_epoch * g // self.grad_accum
        p.epoch, p.batch_in_epoch = epoch, step_in_epoch * self.grad_accum
        p.data_ahead += epoch * size + step_in_epoch * g - before

    def lr_factor(self, step: int) -> float:
        """The lr factor of the update after `step` steps: the smallest of the events whose window holds it."""
        return min(
            (e['lr_factor'] for e in self.state['events'] if e['checkpoint_step'] <= step < e['lr_until_step']),
            default=1.0,
        )


COMPACT = ('n', 'step', 'first_step', 'reason', 'ranks', 'checkpoint', 'checkpoint_step', 'skipped', 'lr_factor')


def compact(record: dict) -> dict:
    """What the run's state keeps of an event (the record adds the dataset indices and the time)."""
    return {k: record[k] for k in (*COMPACT, 'lr_until_step') if k in record}


def read_record(path: Path) -> list:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise NonFiniteLoss(f'{path} is unreadable ({e}); move it aside to go on') from e


def _ranges_text(ranges: list) -> str:
    return ', '.join(f'epoch {e} positions {b}-{end - 1}' for e, b, end in ranges)


def _fp16_overflow(engine) -> bool:
    return bool(engine.fp16_enabled() and getattr(engine.optimizer, 'overflow', False))
