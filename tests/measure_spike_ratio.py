"""How close a healthy run's loss curve comes to the spike rule (docs/reliability.md): the largest ratio of a step's
loss to the median of the previous W steps, and the longest run of steps above a factor, read from a run folder's
TensorBoard (run it with train.log_every_steps=1, so every step's loss is logged).

    python tests/measure_spike_ratio.py RUN_DIR [--window 50] [--factor 3]
"""

import argparse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cmae_ds.engine.guards.divergence import DivergenceDetector, SpikeRule


def losses(run_dir: Path) -> list[float]:
    acc = EventAccumulator(str(run_dir / 'tensorboard'), size_guidance={'scalars': 0})
    acc.Reload()
    by_step = {e.step: e.value for e in acc.Scalars('train/loss')}
    return [by_step[s] for s in sorted(by_step)]


def measure(values: list[float], window: int, factor: float) -> dict:
    detector = DivergenceDetector(SpikeRule(factor, window, 10**9), SpikeRule(0.0, window, 1), {})
    worst, worst_step, longest = 0.0, -1, 0
    for step, loss in enumerate(values, 1):
        ratio = detector.ratio(loss)
        if ratio is not None and ratio > worst:
            worst, worst_step = ratio, step
        detector.observe(step, loss, None, False)
        longest = max(longest, detector.state['loss_run'])
    return {
        'steps': len(values),
        'judged': max(0, len(values) - window),
        'max_ratio': worst,
        'at_step': worst_step,
        'longest_run_above_factor': longest,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('run_dir', type=Path)
    parser.add_argument('--window', type=int, nargs='+', default=[50])
    parser.add_argument('--factor', type=float, default=3.0)
    args = parser.parse_args()
    values = losses(args.run_dir)
    for w in args.window:
        print(f'window {w}: {measure(values, w, args.factor)}')


if __name__ == '__main__':
    main()
