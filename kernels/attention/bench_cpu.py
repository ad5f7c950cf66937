"""SDPA against math attention on the CPU, forward + backward, fp32 and bf16, interleaved (docs/kernels.md).

python -m cmae_ds.kernels.attention.bench_cpu
"""

import time

import torch

from .. import configured
from . import attention


def median_ms(backend: str, dtype: torch.dtype, length: int, reps: int = 5, warmup: int = 2) -> float:
    """Median of `reps` forward + backward passes over q, k, v of shape (8, 12, length, 64)."""
    q, k, v = (torch.randn(8, 12, length, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    times = []
    with configured(attention_backend=backend, environment=False):
        for _ in range(warmup + reps):
            t0 = time.perf_counter()
            attention(q, k, v).sum().backward()
            times.append(time.perf_counter() - t0)
    return sorted(times[warmup:])[reps // 2] * 1e3


def main(rounds: int = 3) -> None:
    torch.set_num_threads(2)
    print('| dtype | L | sdpa ms | math ms | sdpa / math |\n|---|---|---|---|---|')
    for dtype in (torch.float32, torch.bfloat16):
        for length in (50, 197):
            sdpa, math = [], []
            for _ in range(rounds):  # interleaved, so load from other jobs falls on both alike
                sdpa.append(median_ms('sdpa', dtype, length))
                math.append(median_ms('math', dtype, length))
            print(
                f'| {str(dtype).split(".")[-1]} | {length} | {min(sdpa):.1f} | {min(math):.1f} | '
                f'{min(sdpa) / min(math):.2f} |'
            )


if __name__ == '__main__':
    main()
