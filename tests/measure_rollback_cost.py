"""What a rollback costs, in one process: CMAE at a given size (default ViT-B) under DeepSpeed (ZeRO-0 fp32, AdamW
state after one step) is saved with engine.checkpoints.store.save, then the rollback's reload
(engine.checkpoints.resume.restore, what the tasks' load_checkpoint runs: file checks, DeepSpeed's load, the client
state) is timed, warm (in the page cache) and cold (the checkpoint's pages evicted, as for a checkpoint written long
before the event).

  PYTHONPATH=. python tests/measure_rollback_cost.py /tmp/rollback_bench [--size vit_base] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from measure_checkpoint_verify import evict


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
    from cmae_ds.engine.checkpoints import store
    from cmae_ds.engine.checkpoints.resume import restore
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
    ckpt_dir = Path(args.out) / 'checkpoints'
    progress = {'epoch': 0, 'batch_in_epoch': 1, 'step': 1}
    save_s = timed(lambda: store.save(engine, ckpt_dir, 1, {'progress': progress}, 1, True))
    tag = store.tag_for(1)
    size = sum(p.stat().st_size for p in (ckpt_dir / tag).rglob('*') if p.is_file())

    def reload():
        restore(SimpleNamespace(ckpt_dir=ckpt_dir, ctx=ctx, trust=False), tag, engine, model, cfg.model, 1)

    warm, cold = [], []
    for _ in range(args.repeats):
        warm.append(timed(reload))
        evict(ckpt_dir / tag)
        cold.append(timed(reload))
    result = {
        'size': args.size,
        'params_M': round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        'checkpoint_MB': round(size / 2**20, 1),
        'save_s': round(save_s, 2),
        'reload_warm_s': round(statistics.median(warm), 2),
        'reload_cold_s': round(statistics.median(cold), 2),
    }
    print(json.dumps(result, indent=1))
    shutil.rmtree(args.out, ignore_errors=True)


if __name__ == '__main__':
    main()
