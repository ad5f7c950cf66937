#!/usr/bin/env python
"""kNN accuracy (k = 20, cosine similarity, temperature 0.07, as DINO) of a pretrained encoder's frozen features.

  python launch/knn.py runs/debug data.source=folder data.root=train/ val_data.source=folder val_data.root=val/
  deepspeed --num_gpus 8 launch/knn.py runs/cmae_b300 --config my_knn.yaml

The checkpoint is anything modelfiles.formats.load_encoder reads (a run folder or its model.safetensors or older
model.pt, an extracted encoder, a timm ViT, an official pretraining checkpoint or backbone). Our model files
describe their model; otherwise the model section does. Features: mean of the patch tokens after the encoder's final
norm, at model.img_size. Sections: model, data (the labeled training images that vote), val_data, knn. Prints a table
and writes JSON (--out).
"""

import argparse
import json
import sys
from pathlib import Path

from cmae_ds.cli import add_trust_argument


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checkpoint', help='pretraining run folder or model file, encoder, official checkpoint')
    parser.add_argument('--config', default=None, help='YAML file or preset with sections model, data, val_data, knn')
    parser.add_argument('--out', default='knn.json', help='JSON result')
    add_trust_argument(parser)
    parser.add_argument('--local_rank', type=int, default=None, help='set by the DeepSpeed launcher')
    parser.add_argument('overrides', nargs='*', help='section.key=value')
    return parser.parse_intermixed_args(argv)


def _read(checkpoint: Path, fallback, trust: bool):
    """(the file's object, its model config): our model files carry their ModelConfig; anything else uses the
    config's model section."""
    from cmae_ds.config import ModelConfig
    from cmae_ds.modelfiles.formats import read_file

    obj = read_file(checkpoint, 'checkpoint', trust=trust)
    cfg = ModelConfig(**obj['model_config']) if isinstance(obj, dict) and 'model_config' in obj else fallback
    return obj, cfg


def run(args) -> dict:
    from cmae_ds.config import load_task_config
    from cmae_ds.engine.dist import setup_distributed
    from cmae_ds.modelfiles.formats import load_encoder
    from cmae_ds.modelfiles.model_file import run_model_file
    from cmae_ds.tasks.knn import KnnEvaluator, mean_patch_features

    cfg = load_task_config('knn', args.config, args.overrides)
    ckpt = Path(args.checkpoint)
    ckpt = run_model_file(ckpt) if ckpt.is_dir() else ckpt
    obj, model_cfg = _read(ckpt, cfg.model, args.trust_checkpoint)
    ctx = setup_distributed()
    encoder = load_encoder(obj, model_cfg).to(ctx.device).eval()
    evaluator = KnnEvaluator(cfg.task, cfg.data, cfg.val_data, model_cfg.img_size, ctx.rank, ctx.world_size, ctx.device)
    result = evaluator(mean_patch_features(encoder))
    return {
        'checkpoint': str(ckpt),
        'k': cfg.task.k,
        'temperature': cfg.task.temperature,
        'num_classes': evaluator.num_classes,
        'img_size': model_cfg.img_size,
        'world_size': ctx.world_size,
        **result.as_dict(),
    }


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
        rows = [
            ('checkpoint', out['checkpoint']),
            ('k / T', f'{out["k"]} / {out["temperature"]}'),
            ('train images', out['train_images']),
            ('val images', out['images']),
            ('top-1', f'{out["top1"]:.2f}'),
            ('top-5', f'{out["top5"]:.2f}'),
        ]
        width = max(len(k) for k, _ in rows)
        print('\n'.join(f'{k:<{width}}  {v}' for k, v in rows))
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f'results:      {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
