"""Operators per data batch of the torch_gpu views, counted on CPU tensors (docs/benchmarks.md, "Operators per
step and per batch"). Each aten operator a batch runs is about one kernel launch on CUDA; counts do not depend on
the machine's load. Not a test: a measurement that prints JSON.

    PYTHONPATH=. python tests/measure_data_ops.py [--batch 128] [--size 224]
"""

import argparse
import collections
import json

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cmae_ds.data.pipelines.torch_gpu import decode_batch, sample_from_bytes
from cmae_ds.data.sources.files import embedded_samples
from cmae_ds.data.views import batched as G
from cmae_ds.data.views.draws import draw_batch

# Ops that move no data and launch nothing on a device (views, metadata).
FREE = {
    'aten.view',
    'aten._unsafe_view',
    'aten.t',
    'aten.unsqueeze',
    'aten.squeeze',
    'aten.permute',
    'aten.slice',
    'aten.select',
    'aten.expand',
    'aten.alias',
    'aten.as_strided',
    'aten.unbind',
    'aten.detach',
    'aten.split',
    'aten.lift_fresh',
    'aten.empty',
    'aten.empty_strided',
    'aten._local_scalar_dense',
}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name not in FREE:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count(fn) -> dict:
    with Count() as c:
        fn()
    return dict(total=sum(c.ops.values()), top=c.ops.most_common(8))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--batch', type=int, default=128)
    ap.add_argument('--size', type=int, default=224)
    a = ap.parse_args()
    samples = embedded_samples()[: a.batch]
    blobs = [sample_from_bytes(open(p, 'rb').read()) for p, _ in samples]
    imgs = decode_batch(blobs, torch.device('cpu'))
    d = draw_batch(0, 0, np.arange(len(imgs)), 32)
    print(
        json.dumps(dict(batch=len(imgs), size=a.size, views=count(lambda: G.cmae_views(imgs, d, a.size, 32))), indent=1)
    )


if __name__ == '__main__':
    main()
