#!/usr/bin/env python
"""Convert model files between formats (official, ours, encoder only, timm), and run checkpoints to universal.

  python launch/convert_checkpoint.py extract-encoder runs/b300/model.pt encoder.pth model.size=vit_base

  official-to-ours SRC OUT [model.key=value ...]   official CMAE pretraining checkpoint -> our CMAE state dict
  extract-encoder  SRC OUT [model.key=value ...]   online encoder only (ours or official source)
  to-timm          SRC OUT [model.key=value ...]   encoder in timm VisionTransformer names (global_pool='token')
  to-universal     RUN [TAG]                        a run checkpoint (default: the newest complete) in DeepSpeed's
                                                   universal format, cached as RUN/checkpoints/TAG/universal

Model fields default to ViT-B/16 at 224; pass model.size=... or the individual fields for other models.
"""

import argparse
import sys

import torch

from cmae_ds.cli import add_trust_argument
from cmae_ds.config import ConfigError, load_config
from cmae_ds.modelfiles.formats import (
    CheckpointError,
    encoder_state,
    encoder_to_timm,
    extract_encoder,
    load_official_cmae,
)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('action', choices=['official-to-ours', 'extract-encoder', 'to-timm', 'to-universal'])
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
        cfg = load_config(None, args.overrides).model
        trust = args.trust_checkpoint
        if args.action == 'official-to-ours':
            # Loading validates every key and shape before anything is written.
            out = {'state_dict': load_official_cmae(args.src, cfg, trust=trust).state_dict()}
        elif args.action == 'extract-encoder':
            out = extract_encoder(args.src, cfg, trust=trust)
        else:
            out = encoder_to_timm(encoder_state(args.src, trust=trust))
    except (CheckpointError, ConfigError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    torch.save(out, args.out)
    print(f'wrote {args.out}')
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
