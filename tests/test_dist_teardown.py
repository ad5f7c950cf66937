"""The end of a process's distributed life (cmae_ds/engine/dist.py): teardown while the interpreter is whole."""

import os
import signal

import torch

from cmae_ds.engine import dist


def test_a_signal_during_teardown_is_delivered_after_it():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda n, _: seen.append(n))
    try:
        with dist._signals_held():
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(1000):  # Python runs handlers between bytecodes: give it many chances
                pass
            assert seen == []
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_one_process_group_can_be_set_up_again_after_shutdown():
    """In-process callers (tests, notebooks) run several trainings: each gets a fresh group on a fresh port."""
    for _ in range(2):
        ctx = dist.setup_distributed()
        t = torch.ones(2)
        torch.distributed.all_reduce(t)
        assert ctx.world_size == 1 and t.tolist() == [1.0, 1.0]
        dist.shutdown_distributed()
        assert not torch.distributed.is_initialized()
