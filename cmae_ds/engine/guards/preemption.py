"""Preemption: SIGTERM (Slurm and Kubernetes before a kill), SIGINT (Ctrl-C), SIGUSR1 (Slurm's
`--signal=USR1@120`) or the death of the launcher become a request to stop. The ranks agree on it at the next
optimizer-step boundary (one all-reduce on a CPU group, so no device sync: the rollback guard's, which carries
the flag beside the step's loss, guards.agreement), write a complete
checkpoint and exit with cli.EXIT_PREEMPTED. A second SIGINT exits at once: the previous complete checkpoint
stays the resume point, since a checkpoint counts only once marked complete.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import torch

from ..dist import SIGNALS, gather_objects

PEER_REQUEST = 'another rank was asked to stop'


def _cmdline(pid: int) -> str:
    try:
        return Path(f'/proc/{pid}/cmdline').read_bytes().replace(b'\0', b' ').decode(errors='replace')
    except OSError:
        return ''


def _parent_of(pid: int) -> int:
    try:
        return int(Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def launcher_chain() -> list[int]:
    """The processes this rank must not outlive: its parent, and the DeepSpeed runner above
    `deepspeed.launcher.launch` (killing the `deepspeed` command leaves that middle process and the ranks running)."""
    chain = [os.getppid()]
    if 'deepspeed.launcher.launch' in _cmdline(chain[0]):
        grand = _parent_of(chain[0])
        if grand > 1:
            chain.append(grand)
    return chain


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting to be reaped."""
    try:
        state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ('Z', 'X')


class StopRequests:
    """Records the first stop request of this process; `agreed()` asks every rank at a step boundary."""

    def __init__(self, poll_s: float = 1.0):
        self.reason: Optional[str] = None
        self.world_size = 1
        self._previous: dict = {}
        self._group = None
        self._done = threading.Event()
        self._poll_s = poll_s
        self._pid = os.getpid()
        self._decided: Optional[bool] = None

    def install(self) -> 'StopRequests':
        """Signal handlers (main thread only) and the launcher watch; before the process group exists."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        chain = launcher_chain()
        threading.Thread(target=self._watch_launcher, args=(chain,), name='cmae-launcher-watch', daemon=True).start()
        return self

    def attach(self, world_size: int) -> None:
        """Once the process group exists: where the flag is agreed on (collective: every rank calls it)."""
        self.world_size = world_size
        if world_size > 1:
            # The flag travels on a CPU (gloo) group: on GPUs the NCCL group would need a device tensor and a sync.
            gloo = torch.distributed.get_backend() == 'gloo'
            self._group = None if gloo else torch.distributed.new_group(backend='gloo')

    @property
    def group(self):
        """The CPU group that step-boundary agreements travel on (None: the default group, itself gloo)."""
        return self._group

    def restore(self) -> None:
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            print(
                f'cmae_ds: {reason}: stopping after the current optimizer step with a checkpoint '
                '(a second SIGINT exits at once)',
                file=sys.stderr,
                flush=True,
            )

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: its main process decides and shuts it down
            return
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.reason == 'SIGINT':
            print(
                'cmae_ds: second SIGINT: exiting now; the last complete checkpoint stays the resume point',
                file=sys.stderr,
                flush=True,
            )
            os._exit(130)
        self.request(name)

    def _watch_launcher(self, chain: list[int]) -> None:
        while not self._done.wait(self._poll_s):
            # A dead parent re-parents this process, so getppid() changing catches it even if its pid is reused.
            gone = [pid for pid in chain if not _alive(pid)] or ([chain[0]] if os.getppid() != chain[0] else [])
            if gone:
                self.request(f'launcher process {gone[0]} exited')
                return

    def decide(self, any_rank: bool) -> None:
        """This step's agreement, reached inside the rollback guard's collective (guards.agreement): the next
        `agreed()` returns it without a collective of its own."""
        if any_rank and self.reason is None:
            self.reason = PEER_REQUEST
        self._decided = any_rank

    def agreed(self) -> bool:
        """True on every rank when any rank has a request (collective: every rank calls it at every boundary,
        unless this step's `decide()` already carried the flag)."""
        if self._decided is not None:
            decided, self._decided = self._decided, None
            return decided
        local = self.reason is not None
        if self.world_size == 1:
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        if flag.item() and self.reason is None:
            self.reason = PEER_REQUEST
        return bool(flag.item())

    def origins(self) -> dict[int, str]:
        """Which ranks were asked to stop, and why, once `agreed()` said yes (collective)."""
        return {rank: r for rank, r in enumerate(gather_objects(self.reason)) if r not in (None, PEER_REQUEST)}
