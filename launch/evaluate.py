#!/usr/bin/env python
"""Top-1 / top-5 of a fine-tuned classifier on a validation set, on one or many ranks.

  python launch/evaluate.py runs/ft_b300     # our run folder: its model_best.safetensors and val_data
  deepspeed --num_gpus 8 launch/evaluate.py runs/ft_b300/model_last.safetensors val_data.root=/data/imagenet/val
  deepspeed --num_gpus 8 launch/evaluate.py cmae_base_pre300_8x128_100e_in1k_amp_fine.pth --config finetune_vit_base \\
      val_data.source=json val_data.root=data/ImageNet val_data.ann_file=ImageNet_val.json

A run folder means its model_best.safetensors (model_last.safetensors before its first evaluation; model_best.pt in
a run from before safetensors). Our files describe their model; an official fine-tuned .pth takes the architecture
and resolution from the model section (--config, model.* overrides). The validation set is val_data (from --config,
else from the run folder's config.yaml). Every image counts once whatever the number of ranks. Prints a table and
writes JSON (--out).
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from cmae_ds.cli import add_trust_argument


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checkpoint', help='fine-tuning/probing run folder, its model file, or an official .pth')
    parser.add_argument(
        '--config',
        default=None,
        help='YAML file or preset (sections model, val_data); default: '
        "the run folder's config.yaml, else finetune_vit_base",
    )
    parser.add_argument('--num_classes', type=int, default=None, help='check the head has this many classes')
    parser.add_argument('--batch_size', type=int, default=64, help='images per rank per forward')
    parser.add_argument(
        '--precision',
        choices=('auto', 'bf16', 'fp32'),
        default='auto',
        help='auto: bf16 autocast on GPUs, fp32 on the CPU',
    )
    parser.add_argument('--out', default=None, help='JSON result (default: <checkpoint>.eval.json)')
    parser.add_argument('--predictions', action='store_true', help="add every image's prediction to the JSON")
    add_trust_argument(parser)
    parser.add_argument('--local_rank', type=int, default=None, help='set by the DeepSpeed launcher')
    parser.add_argument('overrides', nargs='*', help='section.key=value (model.*, val_data.*)')
    return parser.parse_intermixed_args(argv)


def _config(args):
    """The run folder's own config.yaml when no --config is given (its task section says which task it was)."""
    from cmae_ds.config import load_task_config, read_yaml

    path = args.config
    ckpt = Path(args.checkpoint)
    run_cfg = (ckpt if ckpt.is_dir() else ckpt.parent) / 'config.yaml'
    if path is None:
        path = str(run_cfg) if run_cfg.is_file() else 'finetune_vit_base'
    raw, _ = read_yaml(path)
    return load_task_config('linprobe' if 'linprobe' in raw else 'finetune', path, args.overrides)


def run(args) -> dict:
    import torch

    from cmae_ds.data import build_classification_loader, list_samples
    from cmae_ds.engine.dist import setup_distributed
    from cmae_ds.modelfiles.classifier import load_classifier, resolve_checkpoint
    from cmae_ds.tasks.evaluate import check_labels, evaluate

    cfg = _config(args)
    ctx = setup_distributed()
    loaded = load_classifier(args.checkpoint, cfg.model, args.num_classes, trust=args.trust_checkpoint)
    samples = list_samples(cfg.val_data)
    check_labels(samples, loaded.num_classes, 'val_data')
    loader = build_classification_loader(
        cfg.val_data,
        train=False,
        img_size=loaded.img_size,
        batch_size=args.batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=0,
        device=ctx.device,
        samples=samples,
    )
    model = loaded.model.to(ctx.device).eval()
    bf16 = args.precision == 'bf16' or (args.precision == 'auto' and ctx.device.type == 'cuda')

    def forward(img):
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(img)

    loader.set_epoch(0)
    result = evaluate(forward, loader, ctx.device, keep_predictions=args.predictions)
    if result.images != len(samples):  # the padding rule of the loader broke: never report such a number
        raise RuntimeError(f'counted {result.images} images, the validation set has {len(samples)}')
    out = {
        'checkpoint': str(resolve_checkpoint(args.checkpoint)),
        'model': loaded.description,
        'img_size': loaded.img_size,
        'num_classes': loaded.num_classes,
        'world_size': ctx.world_size,
        'precision': 'bf16' if bf16 else 'fp32',
        'val_data': dataclasses.asdict(cfg.val_data),
        **result.as_dict(),
    }
    if result.predictions is not None:
        out['predictions'] = [
            {'index': i, 'path': str(samples[i][0]), 'pred': p, 'label': t} for i, p, t in result.predictions
        ]
    return out


def report(out: dict, path: Path) -> None:
    rows = [
        ('checkpoint', out['model']),
        ('images', out['images']),
        ('ranks', out['world_size']),
        ('resolution', out['img_size']),
        ('precision', out['precision']),
        ('top-1', f'{out["top1"]:.2f}'),
        ('top-5', f'{out["top5"]:.2f}'),
        ('loss', f'{out["loss"]:.4f}'),
    ]
    width = max(len(k) for k, _ in rows)
    print('\n'.join(f'{k:<{width}}  {v}' for k, v in rows))
    path.write_text(json.dumps(out, indent=2))
    print(f'results:     {path}')


def main(argv=None) -> int:
    args = parse(argv)
    from cmae_ds.errors import USER_ERRORS

    try:
        out = run(args)
    except USER_ERRORS as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    from cmae_ds.engine.dist import is_main_process

    if is_main_process():
        from cmae_ds.modelfiles.classifier import resolve_checkpoint

        ckpt = resolve_checkpoint(args.checkpoint)
        report(out, Path(args.out) if args.out else ckpt.with_name(ckpt.stem + '.eval.json'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
