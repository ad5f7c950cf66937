"""Operators per optimizer step of the real pretraining run on the CPU (docs/benchmarks.md, "Operators per step").
Not a test: a measurement that prints JSON. Counts, not times, so a loaded machine gives the same numbers.

    PYTHONPATH=. python tests/measure_step_ops.py            # ViT-B/16 eager and model.compile=blocks (aot_eager)
    PYTHONPATH=. python tests/measure_step_ops.py --size debug --img 32 model.patch_size=8  # a quick look

The run is the real one (launch/pretrain.py's train(): DeepSpeed engine, loop, rollback guard, EMA) on one rank
with ds_configs/zero2_bf16.json as this checkout has it (micro-batch lowered to --batch); torch.profiler records
one whole optimizer step between two of the run's observer calls (the data, the forward, the backward, DeepSpeed's
step, the guard, the EMA) after two warm-up steps. 'aten ops' counts every aten:: event, nested ones included.
"""

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 2


class OneStep:
    """The observer: profiles the step after the warm-up, from one observer call to the next."""

    def __init__(self):
        self.prof, self.counts = None, None

    def __call__(self, step, engine, model):
        if step == WARMUP:
            self.prof = profile(activities=[ProfilerActivity.CPU])
            self.prof.__enter__()
        elif step == WARMUP + 1:
            self.prof.__exit__(None, None, None)
            self.counts = Counter({e.key: e.count for e in self.prof.key_averages()})


def count(size: str, img: int, batch: int, compile_mode: str, ds_file: str, extra: list) -> dict:
    from cmae_ds.config import load_config
    from cmae_ds.engine import dist
    from cmae_ds.tasks.pretrain import train

    ds = json.loads(Path(ds_file).read_text())
    ds['train_micro_batch_size_per_gpu'] = batch
    with tempfile.TemporaryDirectory() as tmp:
        ds_path = Path(tmp) / 'ds.json'
        ds_path.write_text(json.dumps(ds))
        cfg = load_config(
            None,
            [
                f'model.size={size}',
                f'model.img_size={img}',
                f'model.compile={compile_mode}',
                'data.source=synthetic',
                'train.progress_bar=false',
                'train.log_every_steps=1000',
                'train.image_every_steps=0',
                'train.save_every_steps=0',
                'train.epochs=100',
                f'train.max_steps={WARMUP + 2}',
                f'train.output_dir={tmp}/run',
                *extra,
            ],
        )
        observer = OneStep()
        train(cfg, str(ds_path), resume='none', observer=observer)
        dist.shutdown_distributed()
    c = observer.counts
    aten = {k: n for k, n in c.items() if k.startswith('aten::')}
    top = sorted(aten.items(), key=lambda kv: -kv[1])[:12]
    return {
        'aten ops': sum(aten.values()),
        'distinct aten ops': len(aten),
        '_local_scalar_dense': aten.get('aten::_local_scalar_dense', 0),
        'copy_': aten.get('aten::copy_', 0),
        'most frequent': dict(top),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--size', default='vit_base')
    p.add_argument('--img', type=int, default=224)
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--ds', default=str(ROOT / 'ds_configs' / 'zero2_bf16.json'))
    p.add_argument('--modes', default='eager,blocks')
    p.add_argument('overrides', nargs='*', help='more config overrides, e.g. model.patch_size=8')
    a = p.parse_args()
    os.environ.setdefault('CMAE_COMPILE_BACKEND', 'aot_eager')  # a CPU backend that traces what inductor would
    torch.manual_seed(0)
    out = {'code': str(ROOT), 'ds': a.ds, 'size': a.size, 'img': a.img, 'batch': a.batch}
    for mode in a.modes.split(','):
        out[mode] = count(a.size, a.img, a.batch, mode, a.ds, a.overrides)
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == '__main__':
    main()
