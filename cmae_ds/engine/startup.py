"""A stop signal during start-up (waiting for peers, building the index, loading a checkpoint) ends the process
within a second, with one line.

The run's signal handlers (guards/preemption.py) turn a signal into a request for the next optimizer step, and
before the first step there is none: a rank waiting for its peers in `init_process_group` sat in C++ (torch's
TCPStore), where Python's handlers never run, until the 30-minute collective timeout; only SIGKILL ended it. Python's
C-level handler still writes the signal's number to the wakeup fd (`signal.set_wakeup_fd`) the moment it arrives,
whatever the main thread is doing: a thread reading that fd ends the process. Nothing is lost: before the first
step a run has written nothing since its last complete checkpoint. From the first step on, the handlers' requests
and the checkpoint they lead to take over (`end()`).

SIGTERM and SIGUSR1 (a scheduler's preemption or time-limit warning) exit 75, cli.EXIT_PREEMPTED, as they do
mid-run, so a batch script requeues the job (the same command resumes from the last complete checkpoint); SIGINT (a
person's Ctrl-C) exits 130, as a shell reports it. Before leaving, the cleanups registered with `cleanup` run: rank
0's run.lock is removed, which a requeued job on another node could otherwise take over only with --take-over-lock
after its heartbeat went stale.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

STOPS = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}
PREEMPTED = 75  # cli.EXIT_PREEMPTED (cli imports the engine, not the other way round)
_active: dict = {}  # 'read', 'write' (the pipe) while start-up lasts
_cleanups: list[Callable[[], None]] = []


def begin() -> bool:
    """From here until `end()`, SIGINT, SIGTERM or SIGUSR1 end the process. Main thread only, once: True when this
    call began it (the caller that began it ends it)."""
    if _active or threading.current_thread() is not threading.main_thread():
        return False
    read, write = os.pipe()
    os.set_blocking(write, False)
    try:
        previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except ValueError:
        os.close(read), os.close(write)
        return False
    if previous != -1:  # someone else's (an event loop): theirs stays
        signal.set_wakeup_fd(previous)
        os.close(read), os.close(write)
        return False
    _active.update(read=read, write=write)
    threading.Thread(target=_watch, args=(read,), name='cmae-startup-signals', daemon=True).start()
    return True


def end() -> None:
    """The first step is under way: signals go back to being requests (main thread)."""
    if not _active or threading.current_thread() is not threading.main_thread():
        return
    signal.set_wakeup_fd(-1)
    write = _active.pop('write')
    _active.clear()
    os.close(write)  # the watcher reads EOF and ends


@contextmanager
def cleanup(fn: Callable[[], None]) -> Iterator[None]:
    """While inside, `fn` runs (on the watcher thread) if a start-up signal ends the process."""
    _cleanups.append(fn)
    try:
        yield
    finally:
        _cleanups.remove(fn)


def exit_code(signum: int) -> int:
    """75 for the scheduler's signals (requeue); for SIGINT what a shell reports for death by it, 130."""
    return 128 + signum if signum == signal.SIGINT else PREEMPTED


def _watch(read: int) -> None:
    while True:
        try:
            data = os.read(read, 64)
        except OSError:
            return
        if not data:
            os.close(read)
            return
        signum = next((n for n in data if n in STOPS), None)
        if signum is not None and _active:
            _exit(signum)


def _exit(signum: int) -> None:
    code = exit_code(signum)
    print(
        f'cmae_ds: {signal.Signals(signum).name} during start-up (before the first step): exiting now with code '
        f'{code}; nothing was written since the last complete checkpoint',
        file=sys.stderr,
        flush=True,
    )
    for fn in reversed(list(_cleanups)):
        try:
            fn()
        except Exception as e:  # the exit goes on: a cleanup that fails must not keep the process waiting
            print(f'cmae_ds: start-up cleanup {fn!r} failed: {e}', file=sys.stderr, flush=True)
    os._exit(code)


def _forget_in_child() -> None:
    """A forked worker (a pool building the index, a DataLoader) must not end its parent with its own signals."""
    if _active:
        _active.clear()
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass  # forked from another thread: not this child's main thread, nothing to undo from here


os.register_at_fork(after_in_child=_forget_in_child)
