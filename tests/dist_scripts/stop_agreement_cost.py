"""Cost of the per-step stop agreement next to a training step, on every rank of this launch.

  deepspeed --num_gpus 2 tests/dist_scripts/stop_agreement_cost.py [--calls 2000]

Times StopRequests.agreed() (one all-reduce of one int on a CPU group) alone, then the debug CMAE step on the same
ranks (ZeRO-2, fp32, micro-batch 8, 96 px), and prints both medians and their ratio (rank 0)."""

import argparse
import statistics
import time

import torch

from cmae_ds.config import load_config
from cmae_ds.engine.dist import setup_distributed
from cmae_ds.engine.guards.preemption import StopRequests
from cmae_ds.tasks.benchmark import run_cell


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--calls', type=int, default=2000)
    p.add_argument('--local_rank', type=int, default=None)
    args = p.parse_args()
    ctx = setup_distributed()
    stop = StopRequests()
    stop.attach(ctx.world_size)
    times = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        stop.agreed()
        times.append(time.perf_counter() - t0)
    agree_ms = statistics.median(times) * 1e3
    ds = {
        'train_micro_batch_size_per_gpu': 8,
        'gradient_accumulation_steps': 1,
        'zero_optimization': {'stage': 2},
        'steps_per_print': 10**9,
    }
    step = run_cell('model', load_config('debug'), ds, 'zero2 fp32', ctx, warmup=3, steps=20)
    if ctx.is_main:
        print(
            f'world {ctx.world_size}: agreement median {agree_ms:.3f} ms, p90 '
            f'{sorted(times)[int(0.9 * len(times))] * 1e3:.3f} ms; debug step median {step.step_ms_median:.1f} ms; '
            f'step with agreement / without = {(step.step_ms_median + agree_ms) / step.step_ms_median:.4f}'
        )
    torch.distributed.barrier()


if __name__ == '__main__':
    main()
