"""launch/pretrain.py with poisoned images. The first argument lists KIND:EPOCH:INDEX, comma-separated: in that epoch
the image of that dataset index becomes inf pixels (KIND inf), or its batch's loss is 1000x larger (KIND spike: a
finite spike, scaled in the output of the real CMAE forward, so the gradients follow it). The pipeline and the model
are the real ones; only their outputs are altered, and only in the named epoch (a rollback skips positions of one
epoch's order; the same image comes back in the next epoch)."""

import runpy
import sys
from pathlib import Path

from cmae_ds.models import CMAE
from cmae_ds.tasks import pretrain

POISON = [(kind, int(epoch), int(index)) for kind, epoch, index in (s.split(':') for s in sys.argv.pop(1).split(','))]
SPIKE = {'now': False}
build = pretrain.build_pretrain_loader
forward = CMAE.forward


class Poisoned:
    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            hits = [(kind, batch['index'] == i) for kind, e, i in POISON if e == self.loader.epoch]
            hits = [(kind, rows) for kind, rows in hits if rows.any()]
            SPIKE['now'] = any(kind == 'spike' for kind, _ in hits)
            for kind, rows in hits:
                if kind == 'inf':
                    batch['img'][rows] = float('inf')
            yield batch


def spiking_forward(self, *args, **kwargs):
    out = forward(self, *args, **kwargs)
    if SPIKE['now']:
        out['loss'] = out['loss'] * 1000.0
    return out


CMAE.forward = spiking_forward
pretrain.build_pretrain_loader = lambda *args, **kwargs: Poisoned(build(*args, **kwargs))
script = Path(__file__).resolve().parents[2] / 'launch' / 'pretrain.py'
sys.argv[0] = str(script)
runpy.run_path(str(script), run_name='__main__')
