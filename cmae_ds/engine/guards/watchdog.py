"""Step watchdog: a rank that completes no optimizer step within `factor` x the recent median step time (and at
least `min_s`) dumps every thread's stack to the run folder and exits with cli.EXIT_STALLED, so a frozen peer or
a stuck file system ends the job with a message instead of hanging it. The first `warmup` steps (compilation,
first data) are not judged. Saves and evaluations are phases judged the same way against their own history
(a save of a big model takes minutes, a step seconds); the first of each kind is not judged, and the collective
timeout bounds it instead."""

from __future__ import annotations

import faulthandler
import os
import statistics
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

EXIT_STALLED = 76


class StepWatchdog:
    def __init__(
        self,
        run_dir: Path,
        rank: int,
        factor: float,
        min_s: float,
        warmup: int = 3,
        window: int = 50,
        poll_s: float = 0.5,
    ):
        self.path = Path(run_dir) / f'stall_rank{rank:05d}.txt'
        self.rank, self.factor, self.min_s, self.warmup, self.poll_s = rank, factor, min_s, warmup, poll_s
        self.durations: deque = deque(maxlen=window)
        self.step = 0
        self.last = time.monotonic()
        self.current: Optional[str] = None  # the phase running now
        self.phases: dict[str, deque] = {}
        self._lock = threading.Lock()
        self._done = threading.Event()

    def start(self) -> 'StepWatchdog':
        if self.factor > 0:
            threading.Thread(target=self._watch, name='cmae-step-watchdog', daemon=True).start()
        return self

    def stop(self) -> None:
        self._done.set()

    def beat(self, step: int) -> None:
        """An optimizer step completed."""
        now = time.monotonic()
        with self._lock:
            if self.step > 0:  # the time to the first step is setup, not a step
                self.durations.append(now - self.last)
            self.step, self.last = step, now

    @contextmanager
    def phase(self, name: str):
        """A save or an evaluation: judged against earlier phases of the same name; the step clock restarts after."""
        started = time.monotonic()
        with self._lock:
            self.current, self.last = name, started
        try:
            yield
        finally:
            now = time.monotonic()
            with self._lock:
                self.current = None
                self.phases.setdefault(name, deque(maxlen=self.durations.maxlen)).append(now - started)
                self.last = now

    def limit(self, durations) -> float:
        return max(self.factor * statistics.median(durations), self.min_s)

    def _overdue(self) -> Optional[tuple[str, float, float, float]]:
        """(what, waited, limit, median) when the current step or phase is over its limit."""
        with self._lock:
            if self.current is None:
                durations, what = self.durations, f'no optimizer step completed after step {self.step}'
                judged = len(durations) >= self.warmup
            else:
                durations, what = self.phases.get(self.current), f'{self.current} after step {self.step} did not end'
                judged = bool(durations)
            if not judged:
                return None
            waited, limit = time.monotonic() - self.last, self.limit(durations)
            return (what, waited, limit, statistics.median(durations)) if waited > limit else None

    def _watch(self) -> None:
        while not self._done.wait(self.poll_s):
            overdue = self._overdue()
            if overdue:
                self._fire(*overdue)

    def _fire(self, what: str, waited: float, limit: float, median: float) -> None:
        message = (
            f'cmae_ds watchdog: rank {self.rank} stalled: {what} in {waited:.1f} s (limit {limit:.1f} s = '
            f'max({self.factor:g} x median {median:.3f} s, {self.min_s:g} s)); a peer may be frozen or hung in a '
            f'collective, or the file system stuck. Stacks of every thread: {self.path}'
        )
        try:
            with open(self.path, 'w') as f:
                f.write(message + '\n\n')
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        finally:
            print(message, file=sys.stderr, flush=True)
            os._exit(EXIT_STALLED)
