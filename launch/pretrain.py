#!/usr/bin/env python
"""CMAE (or MAE) pretraining under DeepSpeed, on one process or many ranks and nodes.

  python launch/pretrain.py                                     # embedded default: debug CMAE on shipped photos
  deepspeed --num_gpus 8 launch/pretrain.py --config cmae_vit_base_300e --deepspeed_config ds_configs/zero2_bf16.json \\
      data.root=/data/imagenet/train train.output_dir=runs/cmae_b300
  deepspeed --hostfile hosts launch/pretrain.py --config ... --deepspeed_config ...

Trailing `section.key=value` arguments override any config field (values are parsed as YAML).
"""

import argparse
from pathlib import Path

from cmae_ds.cli import add_run_arguments, exit_process, run_guarded

ROOT = Path(__file__).resolve().parents[1]


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default='debug', help='YAML file or preset name in cmae_ds/presets')
    add_run_arguments(parser, 'DeepSpeed JSON (default: ds_configs/cpu_debug.json, fp32, runs on a CPU or one GPU)')
    return parser.parse_intermixed_args(argv)


def default_ds_config() -> str:
    return str(ROOT / 'ds_configs' / 'cpu_debug.json')


def knn_monitor(cfg):
    """kNN accuracy of the online encoder every knn.every_steps steps (knn_train / knn_val: labeled sets)."""
    if cfg.knn.every_steps <= 0:
        return None
    from cmae_ds.tasks.knn import KnnMonitor

    return KnnMonitor(cfg.knn, cfg.knn_train, cfg.knn_val, cfg.model.img_size, run_dir=Path(cfg.train.output_dir))


def main(argv=None) -> int:
    args = parse(argv)
    return run_guarded(lambda: run(args))


def run(args) -> int:
    from cmae_ds.config import load_config
    from cmae_ds.tasks.pretrain import train

    cfg = load_config(args.config, args.overrides)
    observer = knn_monitor(cfg)
    try:
        result = train(
            cfg,
            args.ds_config or default_ds_config(),
            resume=args.resume,
            observer=observer,
            trust_checkpoint=args.trust_checkpoint,
            take_over_lock=args.take_over_lock,
        )
    finally:
        if observer is not None:
            observer.close()
    from cmae_ds.engine.dist import is_main_process

    if is_main_process():
        print(
            f'done: {result.steps} steps, loss {result.first_loss:.4f} -> {result.last_loss:.4f}'
            if result.first_loss is not None
            else f'done: {result.steps} steps'
        )
        print(f'checkpoint:  {result.checkpoint}')
        print(f'model file:  {result.model_file}')
        print(f'tensorboard: tensorboard --logdir {result.run_dir / "tensorboard"}')
        print(f'images:      {result.run_dir / "images"}')
    return 0


if __name__ == '__main__':
    exit_process(main())
