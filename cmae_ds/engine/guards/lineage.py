"""Which checkpoints a rollback may return to and which it may delete, by the order they were written.

Step numbers alone cannot say: a resume with another global batch renumbers the steps (engine/checkpoints/elastic.py),
so a checkpoint written before the resume can carry a larger step than every one the resumed run writes. What the
run found on disk when it started is its past: the checkpoint it resumed from and those written before it are all
before any event of this run, and none of them is ever deleted by a rollback. Checkpoints written after the resumed one
by an earlier run (a `--resume` of an older tag) belong to a timeline this run left: neither a target nor deleted.
Only the run's own checkpoints are numbered as its events are, and only they are judged by step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..checkpoints import store


def _written(ckpt_dir: Path, tag: str) -> tuple:
    """A checkpoint's identity: a tag rewritten by this run (same name, later marker) is another checkpoint."""
    try:
        return tag, float(store.read_marker(ckpt_dir, tag).get('time', 0.0))
    except (OSError, ValueError):
        return tag, 0.0


@dataclass(frozen=True)
class Lineage:
    ckpt_dir: Path
    past: tuple
    """(tag, marker time) of the checkpoints before this run, in write order, up to the resumed one."""
    left: frozenset
    """(tag, marker time) of the checkpoints found at start but written after the resumed one."""

    @classmethod
    def at_start(cls, ckpt_dir: Path, resumed: Optional[str]) -> 'Lineage':
        found = [_written(ckpt_dir, tag) for tag in store.complete_tags(ckpt_dir)]
        names = [tag for tag, _ in found]
        end = names.index(resumed) + 1 if resumed in names else 0
        return cls(ckpt_dir, tuple(found[:end]), frozenset(found[end:]))

    def _own(self, written: tuple) -> bool:
        return written not in self.left and written not in self.past

    def _own_steps(self) -> list[tuple]:
        """(tag, step) of this run's own checkpoints, oldest written first."""
        tags = [tag for tag in store.complete_tags(self.ckpt_dir) if self._own(_written(self.ckpt_dir, tag))]
        return [(tag, store.read_marker(self.ckpt_dir, tag)['step']) for tag in tags]

    def before(self, first_step: int) -> list[str]:
        """Tags a rollback of an event that began at `first_step` may return to, oldest written first."""
        past = [tag for tag, _ in self.past if _written(self.ckpt_dir, tag) in self.past]
        return past + [tag for tag, step in self._own_steps() if step < first_step]

    def after(self, first_step: int) -> list[str]:
        """This run's own checkpoints written at or after the event's first step: they hold its diverged weights."""
        return [tag for tag, step in self._own_steps() if step >= first_step]
