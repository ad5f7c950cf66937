"""One writer per run folder: rank 0 of a run holds `<run>/run.lock` (holder host, pid, start time, heartbeat) for
as long as it trains; the other ranks trust it.

A second run in the same folder refuses to start and names the holder. A lock whose holder is provably gone (its
pid is dead, or reused, on this machine) is taken over with a warning: nothing can still write through it. A lock
from another machine can only be judged by its heartbeat, which a daemon thread refreshes every HEARTBEAT_S; with
`--take-over-lock` it is taken over once the heartbeat is older than STALE_AFTER_S (a requeued job on another
node), waiting for that if it is still fresh, and refused if it keeps beating. A live holder on this machine is
never taken over.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from ...errors import RunLockedError
from ...storage.output_dir import MIN_FREE_BYTES, check_output_dir
from .. import startup
from ..checkpoints import store
from ..slurm import slurm_rank

LOCK = 'run.lock'
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0


def _boot_id() -> str:
    """Same kernel, same boot: pids on this machine are comparable (containers on one node share it)."""
    try:
        return Path('/proc/sys/kernel/random/boot_id').read_text().strip()
    except OSError:
        return ''


def _proc_start(pid: int) -> Optional[int]:
    """Start time of `pid` in clock ticks since boot (Linux), so a reused pid is not mistaken for the holder."""
    try:
        stat = Path(f'/proc/{pid}/stat').read_text()
    except OSError:
        return None
    return int(stat.rsplit(')', 1)[1].split()[19])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Holder:
    host: str
    boot_id: str
    pid: int
    proc_start: Optional[int]
    started: float
    heartbeat: float
    command: str
    token: str

    @classmethod
    def me(cls) -> 'Holder':
        now = time.time()
        return cls(
            socket.gethostname(),
            _boot_id(),
            os.getpid(),
            _proc_start(os.getpid()),
            now,
            now,
            ' '.join(sys.argv)[:300],
            uuid.uuid4().hex,
        )

    def same_machine(self) -> bool:
        return self.boot_id == _boot_id() if self.boot_id and _boot_id() else self.host == socket.gethostname()

    def alive_here(self) -> bool:
        """On this machine: the holder's process still runs (same pid and start time)."""
        if not _pid_alive(self.pid):
            return False
        start = _proc_start(self.pid)
        return self.proc_start is None or start is None or start == self.proc_start

    def age(self) -> float:
        return time.time() - self.heartbeat

    def describe(self) -> str:
        started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))
        return f'pid {self.pid} on {self.host}, started {started}, heartbeat {self.age():.0f} s ago ({self.command})'


def _read(path: Path) -> Optional[Holder]:
    try:
        return Holder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        # unreadable or from another version: judged by the file's age alone
        mtime = path.stat().st_mtime if path.exists() else 0.0
        return Holder('unknown host', '', -1, None, mtime, mtime, f'unreadable lock file {path}', '')


class RunLock:
    """The lock of one run folder, held by this process from acquire() to release()."""

    def __init__(
        self,
        run_dir: Path,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
        log: Callable[[str], None] = lambda msg: print(f'warning: {msg}', file=sys.stderr, flush=True),
    ):
        self.path = Path(run_dir) / LOCK
        self.heartbeat_s, self.stale_after_s, self.log = heartbeat_s, stale_after_s, log
        self.me: Optional[Holder] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self, take_over: bool = False) -> None:
        me = Holder.me()
        while not self._create(me):
            holder = _read(self.path)
            if holder is None:
                continue  # released between our try and our look
            self._judge(holder, take_over)
            self._remove_stale(holder)
        self.me = me
        self._thread = threading.Thread(target=self._beat, name='run-lock-heartbeat', daemon=True)
        self._thread.start()

    def _create(self, me: Holder) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, 'w') as f:
            f.write(json.dumps(asdict(me)))
        return True

    def _judge(self, holder: Holder, take_over: bool) -> None:
        """Returns when `holder` is gone (then its lock may be removed); raises RunLockedError otherwise."""
        where = f'{self.path.parent} is in use by another run: {holder.describe()}'
        if holder.same_machine() and holder.pid >= 0:
            if holder.alive_here():
                raise RunLockedError(f'{where}; stop that run or choose another output folder')
            self.log(f'taking over the lock of {self.path.parent}: its holder ({holder.describe()}) has exited')
            return
        if not take_over:
            raise RunLockedError(
                f'{where}; if that job is gone (a requeued job on another node), start this one '
                f'with --take-over-lock (it waits until the heartbeat is {self.stale_after_s:.0f} s '
                'old)'
            )
        self._wait_until_stale(holder, where)
        self.log(f'taking over the lock of {self.path.parent} from {holder.describe()}')

    def _wait_until_stale(self, holder: Holder, where: str) -> None:
        """A holder on another machine is gone once its heartbeat stops for stale_after_s."""
        while holder.age() < self.stale_after_s:
            time.sleep(min(self.heartbeat_s, self.stale_after_s - holder.age() + 0.05))
            newer = _read(self.path)
            if newer is None:
                return
            if newer.token != holder.token or newer.heartbeat != holder.heartbeat:
                raise RunLockedError(f'{where}; it is still beating, so it was not taken over')

    def _remove_stale(self, holder: Holder) -> None:
        """Rename, then delete: of two runs taking over the same stale lock, only one rename succeeds."""
        aside = self.path.with_name(f'{LOCK}.stale.{os.getpid()}')
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        taken = _read(aside)
        if taken is not None and taken.token != holder.token:
            os.rename(aside, self.path)  # another run took it over between our look and our rename: give it back
            raise RunLockedError(f'{self.path.parent}: another run took its lock at the same time ({taken.describe()})')
        aside.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = _read(self.path)
            if current is None or current.token != self.me.token:
                self.log(
                    f"the lock of {self.path.parent} is no longer this run's "
                    f'({current.describe() if current else "removed"}); heartbeat stopped'
                )
                return
            self.me.heartbeat = time.time()
            tmp = self.path.with_name(f'{LOCK}.{os.getpid()}.tmp')
            try:
                tmp.write_text(json.dumps(asdict(self.me)))
                os.replace(tmp, self.path)
            except OSError:
                tmp.unlink(missing_ok=True)  # a full disk stops the save first; the next beat tries again

    def release(self) -> None:
        if self.me is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = _read(self.path)
        if current is not None and current.token == self.me.token:
            self.path.unlink(missing_ok=True)
        self.me = None


def _is_rank0() -> bool:
    """From the launcher's environment (or srun's): the lock is taken before the process group exists."""
    rank = os.environ.get('RANK')
    return int(rank) == 0 if rank is not None else slurm_rank(os.environ) in (None, 0)


@contextmanager
def guard(run_dir: Path | str, take_over: bool = False, key: str = 'train.output_dir') -> Iterator[None]:
    """Around a training run: the run folder is writable with room for a checkpoint (every rank: each writes its
    own files), and rank 0 holds its lock until the run ends, normally or by an exception."""
    run_dir = Path(run_dir)
    need = max(store.newest_size(run_dir / 'checkpoints'), MIN_FREE_BYTES)
    check_output_dir(run_dir, need_bytes=need, key=key)
    lock = RunLock(run_dir) if _is_rank0() else None
    if lock is not None:
        lock.acquire(take_over)
    try:
        # a start-up signal ends the process without unwinding this: the lock goes with it
        with startup.cleanup(lock.release if lock is not None else lambda: None):
            yield
    finally:
        if lock is not None:
            lock.release()
