#!/usr/bin/env python
"""Fine-tune a pretrained CMAE encoder (the official recipe of spec section 9), or probe it linearly.

  python launch/finetune.py --config finetune_debug finetune.pretrained=runs/debug     # CPU smoke run
  deepspeed --num_gpus 8 launch/finetune.py --config finetune_vit_base --deepspeed_config ds_configs/zero1_bf16.json \\
      finetune.pretrained=runs/cmae_vit_base_300e/model.pt data.root=/data/imagenet/train \\
      val_data.root=/data/imagenet/val finetune.output_dir=runs/ft_b300
  deepspeed --num_gpus 8 launch/finetune.py --linear-probe --config linprobe_vit_base ...   # = launch/linear_probe.py

Trailing `section.key=value` arguments override the config (sections: model, data, val_data, finetune or linprobe).
The run folder gets model_best.pt and model_last.pt for launch/evaluate.py; see docs/finetune.md.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse(argv=None, linear_probe: bool = False):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default=None,
                        help='YAML file or preset name (default: finetune_vit_base, or linprobe_vit_base)')
    parser.add_argument('--deepspeed_config', '--ds_config', dest='ds_config', default=None,
                        help='DeepSpeed JSON (default: ds_configs/zero1_bf16.json on GPUs (linear probe: '
                             'linprobe_bf16.json), ds_configs/cpu_debug.json without a GPU)')
    parser.add_argument('--linear-probe', '--linear_probe', dest='linear_probe', action='store_true',
                        default=linear_probe, help='linear probing (MAE protocol) instead of fine-tuning')
    parser.add_argument('--resume', default='auto', help="'auto' (newest complete checkpoint), 'none', or a tag")
    parser.add_argument('--take-over-lock', '--take_over_lock', dest='take_over_lock', action='store_true',
                        help="take over the run folder's lock from a run that is gone (see docs/reliability.md)")
    parser.add_argument('--local_rank', type=int, default=None, help='set by the DeepSpeed launcher')
    parser.add_argument('overrides', nargs='*', help='section.key=value')
    return parser.parse_args(argv)


def default_ds_config(linear_probe: bool) -> str:
    import torch
    if not torch.cuda.is_available():
        return str(ROOT / 'ds_configs' / 'cpu_debug.json')
    return str(ROOT / 'ds_configs' / ('linprobe_bf16.json' if linear_probe else 'zero1_bf16.json'))


def main(argv=None, linear_probe: bool = False) -> int:
    args = parse(argv, linear_probe)
    from cmae_ds.config import load_task_config
    from cmae_ds.engine import run_lock
    from cmae_ds.engine.finetune import NonFiniteLoss, train
    from cmae_ds.errors import USER_ERRORS
    task = 'linprobe' if args.linear_probe else 'finetune'
    try:
        cfg = load_task_config(task, args.config or f'{task}_vit_base', args.overrides)
        with run_lock.guard(cfg.task.output_dir, take_over=args.take_over_lock, key=f'{task}.output_dir'):
            result = train(cfg, args.ds_config or default_ds_config(args.linear_probe), resume=args.resume)
    except USER_ERRORS as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f'training stopped: {e}', file=sys.stderr)
        return 3
    from cmae_ds.engine.dist import is_main_process
    if is_main_process():
        print(f'done: {result.steps} steps' + (f', last loss {result.last_loss:.4f}' if result.last_loss else ''))
        if result.best_top1 >= 0:
            print(f'best top-1:  {result.best_top1:.2f}')
        best = result.run_dir / 'model_best.pt'
        print(f'best model:  {best if best.is_file() else "none (no evaluation yet)"}')
        print(f'last model:  {result.run_dir / "model_last.pt"}')
        print(f'metrics:     {result.run_dir / "metrics.jsonl"}')
        print(f'tensorboard: tensorboard --logdir {result.run_dir / "tensorboard"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
