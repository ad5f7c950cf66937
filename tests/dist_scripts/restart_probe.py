"""A torchrun worker for tests/test_torchrun_restart.py: one process group made by cmae_ds.engine.dist (the code a
run uses), one all-reduce, and in the first attempt the death of the worker of the agent started with
PROBE_VICTIM=1 while the other worker is busy outside any collective (a long step): its agent stays healthy and
restarts its worker only because a node waits in the next rendezvous round, which leaves its
TORCHELASTIC_RESTART_COUNT where it was. Argument: a folder both agents see."""

import os
import signal
import sys
import time
from pathlib import Path

import torch

from cmae_ds.engine.dist import setup_distributed

folder = Path(sys.argv[1])
attempt = os.environ['TORCHELASTIC_RESTART_COUNT']
ctx = setup_distributed(timeout_s=60)
first = not (folder / 'killed').exists()  # read by both before the all-reduce, written by one after it
total = torch.ones(1)
torch.distributed.all_reduce(total)
if first:
    if os.environ.get('PROBE_VICTIM') == '1':
        (folder / 'killed').touch()
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)  # the healthy node's step; its agent ends it to rejoin
print(f'probe: restart count {attempt}, rank {ctx.rank} of {ctx.world_size}, sum {int(total.item())}', flush=True)
