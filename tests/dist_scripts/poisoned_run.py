"""launch/pretrain.py (second argument 'pretrain') or launch/finetune.py ('finetune', training images only) with
poisoned images. The first argument lists KIND:EPOCH:INDEX, comma-separated: in that epoch
the image of that dataset index becomes inf pixels (KIND inf), or its batch's loss is 1000x larger (KIND spike: a
finite spike) or NaN (KIND nan: on that rank alone, as a forward that overflowed there), scaled in the output of the
real CMAE forward, so the gradients follow it. The pipeline and the model are the real ones; only their outputs are
altered, and only in the named epoch (a rollback skips positions of one epoch's order; the same image comes back in
the next epoch)."""

import math
import runpy
import sys
from pathlib import Path

from cmae_ds.models import CMAE
from cmae_ds.tasks import finetune, pretrain

# the deepspeed launcher puts --local_rank=N first
FIRST = 2 if sys.argv[1].startswith('--local_rank') else 1
SPEC, TASK = sys.argv.pop(FIRST), sys.argv.pop(FIRST)
POISON = [(kind, int(epoch), int(index)) for kind, epoch, index in (s.split(':') for s in SPEC.split(','))]
SCALES = {'spike': 1000.0, 'nan': math.nan}
SCALE = {'now': 1.0}
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
            SCALE['now'] = math.prod(SCALES.get(kind, 1.0) for kind, _ in hits)
            for kind, rows in hits:
                if kind == 'inf':
                    batch['img'][rows] = float('inf')
            yield batch


def spiking_forward(self, *args, **kwargs):
    out = forward(self, *args, **kwargs)
    if SCALE['now'] != 1.0:
        out['loss'] = out['loss'] * SCALE['now']
    return out


CMAE.forward = spiking_forward
build_pretrain, build_classification = pretrain.build_pretrain_loader, finetune.build_classification_loader
pretrain.build_pretrain_loader = lambda *args, **kwargs: Poisoned(build_pretrain(*args, **kwargs))
finetune.build_classification_loader = lambda *args, train, **kwargs: (Poisoned if train else lambda loader: loader)(
    build_classification(*args, train=train, **kwargs)
)
script = Path(__file__).resolve().parents[2] / 'launch' / f'{TASK}.py'
sys.argv[0] = str(script)
runpy.run_path(str(script), run_name='__main__')
