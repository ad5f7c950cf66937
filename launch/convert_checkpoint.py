#!/usr/bin/env python
"""Convert model files between formats (official, ours, encoder only, timm), and run checkpoints to universal.

  python launch/convert_checkpoint.py extract-encoder runs/b300/model.safetensors enc.safetensors model.size=vit_base

  official-to-ours SRC OUT [model.key=value ...]   official CMAE pretraining checkpoint -> our CMAE state dict
  extract-encoder  SRC OUT [model.key=value ...]   online encoder only (ours or official source)
  to-timm          SRC OUT [model.key=value ...]   encoder in timm VisionTransformer names (global_pool='token'),
                                                   loadable by timm.create_model(..., pretrained_cfg_overlay=
                                                   dict(file=OUT)); prints the timm model name
  to-safetensors   SRC [OUT]                        one of our .pt model files (model.pt, encoder, timm export,
                                                   model_best.pt/model_last.pt) as .safetensors (default: SRC's name)
  to-universal     RUN [TAG]                        a run checkpoint (default: the newest complete) in DeepSpeed's
                                                   universal format, cached as RUN/checkpoints/TAG/universal

OUT ending .safetensors (or any name but .pt/.pth/.bin) is written as safetensors with the description (format,
model config, training facts) as JSON in its metadata; OUT ending .pt/.pth/.bin in the old pickled form. A model card
(README.md) is written beside every OUT.
Model fields default to ViT-B/16 at 224, or those the source file describes; pass model.size=... or the individual
fields for other models.
"""

import argparse
import sys

from cmae_ds.cli import add_trust_argument
from cmae_ds.config import ConfigError
from cmae_ds.modelfiles.exports import export
from cmae_ds.modelfiles.formats import CheckpointError
from cmae_ds.storage.output_dir import OutputWriteError


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        'action', choices=['official-to-ours', 'extract-encoder', 'to-timm', 'to-safetensors', 'to-universal']
    )
    parser.add_argument('src')
    parser.add_argument('out', nargs='?', default=None)
    add_trust_argument(parser)
    parser.add_argument('overrides', nargs='*', help='model.key=value')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.action == 'to-universal':
        return to_universal(args.src, args.out)
    try:
        written = export(args.action, args.src, args.out, args.overrides, trust=args.trust_checkpoint)
    except (CheckpointError, ConfigError, OutputWriteError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    for line in written:
        print(line)
    return 0


def to_universal(run: str, tag=None) -> int:
    import time
    from pathlib import Path

    from cmae_ds.engine.checkpoints.elastic import convert
    from cmae_ds.engine.checkpoints.store import find_resume_tag

    ckpt = Path(run) / 'checkpoints'
    tag = tag or find_resume_tag(ckpt)
    if tag is None or not (ckpt / tag / 'complete.json').is_file():
        print(f'error: no complete checkpoint {tag or ""} in {ckpt}', file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        out = convert(ckpt / tag)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'wrote {out} ({time.perf_counter() - start:.1f} s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
