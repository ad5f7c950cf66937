"""One rank of a 2-rank gloo group set up by cmae_ds.engine.dist.setup_distributed(timeout_s=argv[1]); rank 1 never
joins the collective (it sleeps argv[2] s, then exits); rank 0 prints how its all_reduce ended and after how long.
Started by tests/test_collective_timeout.py with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set."""

import os
import sys
import time

import torch

from cmae_ds.engine.dist import setup_distributed

ctx = setup_distributed(timeout_s=float(sys.argv[1]))
if ctx.rank == 1:
    time.sleep(float(sys.argv[2]))
    os._exit(0)
start = time.monotonic()
try:
    torch.distributed.all_reduce(torch.ones(1))
    print(f'completed after {time.monotonic() - start:.1f} s', flush=True)
except Exception as e:  # what a hung peer turns into: the collective's own error
    print(f'failed after {time.monotonic() - start:.1f} s: {type(e).__name__}: {e}'[:400], flush=True)
os._exit(0)  # no teardown with a peer that never answers
