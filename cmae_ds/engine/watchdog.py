"""Step watchdog: a rank that completes no optimizer step within `factor` x the recent median step time (and at
least `min_s`) dumps every thread's stack to the run folder and exits with cli.EXIT_STALLED, so a frozen peer or
a stuck file system ends the job with a message instead of hanging it. The first `warmup` steps (compilation,
first data) are not judged, and saves and evaluations run with the watchdog paused."""

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
        self.paused_for = 0
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
    def paused(self):
        """Saves and evaluations take as long as they take; the clock restarts after them."""
        with self._lock:
            self.paused_for += 1
        try:
            yield
        finally:
            with self._lock:
                self.paused_for -= 1
                self.last = time.monotonic()

    def limit(self) -> float:
        return max(self.factor * statistics.median(self.durations), self.min_s)

    def _watch(self) -> None:
        while not self._done.wait(self.poll_s):
            with self._lock:
                if self.paused_for or len(self.durations) < self.warmup:
                    continue
                waited, limit, median = time.monotonic() - self.last, self.limit(), statistics.median(self.durations)
            if waited > limit:
                self._fire(waited, limit, median)

    def _fire(self, waited: float, limit: float, median: float) -> None:
        message = (
            f'cmae_ds watchdog: rank {self.rank} stalled: no optimizer step completed for {waited:.1f} s '
            f'after step {self.step} (limit {limit:.1f} s = max({self.factor:g} x median step '
            f'{median:.3f} s, {self.min_s:g} s)); a peer may be frozen or hung in a collective, or the '
            f'file system stuck. Stacks of every thread: {self.path}'
        )
        try:
            with open(self.path, 'w') as f:
                f.write(message + '\n\n')
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        finally:
            print(message, file=sys.stderr, flush=True)
            os._exit(EXIT_STALLED)
