"""What verifying a checkpoint costs next to loading it, in one process: CMAE at a given size (default ViT-B) under
DeepSpeed (ZeRO-0 fp32, AdamW state after one step) is saved with engine.checkpoints.store.save, then
engine.checkpoints.verify.verify and store.load are timed on the same files, warm (in the page cache, as right after a
save) and cold (the checkpoint's pages evicted with posix_fadvise, as after a requeue on another node).

  PYTHONPATH=. python tests/measure_checkpoint_verify.py /tmp/ckpt_bench [--size vit_base] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch


def evict(tag_dir: Path) -> None:
    """Drop this checkpoint's pages from the page cache (only its own files: nothing else on the machine)."""
    os.sync()
    for p in tag_dir.rglob('*'):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('out', help='an empty folder for the checkpoint (removed afterwards)')
    parser.add_argument('--size', default='vit_base')
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()

    from cmae_ds.config import load_config
    from cmae_ds.config.ds_config import validate
    from cmae_ds.engine.checkpoints import store as checkpointing
    from cmae_ds.engine.checkpoints.verify import checksums, manifest, sizes
    from cmae_ds.engine.checkpoints.verify import verify as verify_files
    from cmae_ds.engine.dist import setup_distributed
    from cmae_ds.tasks.pretrain import build_engine, train_step

    ctx = setup_distributed()
    # a small image keeps the one CPU step cheap; the parameter count is the size's (but for the position table)
    cfg = load_config('debug', [f'model.size={args.size}', 'model.img_size=64', 'model.patch_size=16'])
    ds = {
        'train_micro_batch_size_per_gpu': 2,
        'gradient_accumulation_steps': 1,
        'zero_optimization': {'stage': 0},
        'steps_per_print': 10**9,
    }
    engine, model, _ = build_engine(cfg, ds, validate(ds, cfg, 1, path='bench'), ctx, 1e-4)
    img = torch.randn(2, 3, 64, 64)
    train_step(engine, {'img': img, 'img_target': img}, torch.float32)
    out = Path(args.out)
    ckpt_dir = out / 'checkpoints'
    save_s = timed(lambda: checkpointing.save(engine, ckpt_dir, 1, {}, 1, True, rank_state={'x': 1}))
    tag = checkpointing.tag_for(1)
    tag_dir = ckpt_dir / tag
    files = manifest(ckpt_dir, tag)
    total = sum(f['size'] for f in files.values())
    sums_s = timed(lambda: checksums(tag_dir, [sizes(tag_dir)]))

    def verify():
        assert verify_files(ckpt_dir, tag, files) is None

    def load():
        checkpointing.load(engine, ckpt_dir, tag)

    rows = {k: [] for k in ('verify_warm', 'load_warm', 'verify_cold', 'load_after_verify', 'load_cold')}
    for _ in range(args.repeats):
        rows['verify_warm'].append(timed(verify))
        rows['load_warm'].append(timed(load))
        evict(tag_dir)
        rows['verify_cold'].append(timed(verify))
        rows['load_after_verify'].append(timed(load))
        evict(tag_dir)
        rows['load_cold'].append(timed(load))
    med = {k: statistics.median(v) for k, v in rows.items()}
    params = sum(p.numel() for p in model.parameters())
    result = {
        'size': args.size,
        'params_M': round(params / 1e6, 1),
        'checkpoint_MB': round(total / 2**20, 1),
        'files': len(files),
        'save_s': round(save_s, 2),
        'checksums_at_save_s': round(sums_s, 2),
        **{f'{k}_s': round(v, 2) for k, v in med.items()},
        'verify/load warm': round(med['verify_warm'] / med['load_warm'], 3),
        'verify/load cold': round(med['verify_cold'] / med['load_cold'], 3),
        'resume cold with/without verify': round((med['verify_cold'] + med['load_after_verify']) / med['load_cold'], 3),
    }
    print(json.dumps(result, indent=1))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == '__main__':
    main()
