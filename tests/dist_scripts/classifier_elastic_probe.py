"""Run under the DeepSpeed launcher by tests/test_elastic.py: `classifier_elastic_probe.py --probe-out=OUT
<launch/finetune.py arguments>` runs the real fine-tuning or probing entry point, recording on rank 0 the
classifier's full state (trained weights, optimizer state, buffers, group settings) before each checkpoint save and
right after a resume.
"""

import atexit
import os
import runpy
import sys
from pathlib import Path

import torch

from cmae_ds.engine.checkpoints import store as checkpointing
from cmae_ds.tasks import finetune

ROOT = Path(__file__).resolve().parents[2]


def _zero_moments(engine, named) -> dict:
    """Collective under ZeRO-3 (gathers). ZeRO-1/2 link moments to parameters lazily."""
    from deepspeed.utils import safe_get_full_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, 'single_partition_of_fp32_groups'):
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        for group, flat in zip(opt.bit16_groups, opt.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(group, flat, opt.optimizer.state)
    # Adam's moments or LARS's 'mu': whatever per-element state the optimizer keeps
    keys = {k for st in opt.optimizer.state.values() for k, v in st.items() if torch.is_tensor(v) and v.dim()}
    return {n: {k: safe_get_full_optimizer_state(p, k).clone() for k in sorted(keys)} for n, p in named}


def full_state(engine) -> dict:
    model = engine.module
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    base = getattr(engine.optimizer, 'optimizer', engine.optimizer)
    if engine.zero_optimization_stage() == 0:  # the optimizer holds the module's own parameters
        weights = {n: p.detach().float().clone() for n, p in named}
        optim = {
            n: {k: v.clone() for k, v in base.state[p].items() if torch.is_tensor(v) and v.dim()} for n, p in named
        }
    else:
        from deepspeed.utils import safe_get_full_fp32_param

        weights = {n: safe_get_full_fp32_param(p).clone() for n, p in named}
        optim = _zero_moments(engine, named)
    return {
        'weights': weights,
        'optim': optim,
        'buffers': {n: b.detach().clone() for n, b in model.named_buffers()},
        'steps': sorted({float(st['step']) for st in base.state.values() if 'step' in st}),
        # 'lr' is not state: the loop sets it from the schedule at the resumed step before the first step.
        'groups': [{k: v for k, v in g.items() if k not in ('params', 'step', 'lr')} for g in base.param_groups],
    }


def main():
    # The launcher puts --local_rank first, so the probe's own option is found by name.
    (out,) = [a.split('=', 1)[1] for a in sys.argv if a.startswith('--probe-out=')]
    sys.argv = [a for a in sys.argv if not a.startswith('--probe-out=')]
    seen = {}
    restore, save = finetune.restore, checkpointing.Checkpointer.save

    def recording_restore(run, tag, engine, *args, **kwargs):
        progress = restore(run, tag, engine, *args, **kwargs)
        if progress is not None:
            seen['resumed'] = (progress, full_state(engine))
        return progress

    def recording_save(self, step):
        seen[step] = full_state(self.engine)
        return save(self, step)

    finetune.restore, checkpointing.Checkpointer.save = recording_restore, recording_save
    sys.argv[0] = str(ROOT / 'launch' / 'finetune.py')
    if os.environ.get('RANK', '0') == '0':  # the script ends through its exit handlers (cli.exit_process)
        atexit.register(lambda: torch.save(seen, out))
    runpy.run_path(sys.argv[0], run_name='__main__')


if __name__ == '__main__':
    main()
