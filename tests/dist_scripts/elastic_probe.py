"""Run under the DeepSpeed launcher by tests/test_elastic.py: train() with --resume, recording on rank 0 the full
state (online fp32 weights, target, buffers, Adam moments and step, group lr and weight decay, progress) when the
run starts and after each optimizer step listed in --record.

Masks are drawn from a generator seeded by each image's content instead of the rank's mask stream (a wrapper
around CMAE.forward that replaces the mask the training step drew from that stream), so that the same images get the
same masks on any number of ranks: the only test-side change, and what lets a resumed run on another layout be
compared with an uninterrupted one.
"""

import argparse
import hashlib

import torch
import torch.distributed as dist

from cmae_ds.cli import exit_process
from cmae_ds.config import load_config
from cmae_ds.models import CMAE
from cmae_ds.tasks.pretrain import train

_forward = CMAE.forward


def _image_seed(img: torch.Tensor) -> int:
    return int.from_bytes(hashlib.sha256(img.detach().float().cpu().numpy().tobytes()).digest()[:7], 'little')


def forward_with_image_masks(self, img, img_target=None, mask=None, generator=None):
    # The step draws its mask before the forward (tasks/pretrain.py, so that the forward compiles); that draw still
    # advances the rank's stream as in training, and is replaced here.
    mask = torch.cat(
        [self.random_mask(1, img.device, generator=torch.Generator().manual_seed(_image_seed(x))) for x in img]
    )
    return _forward(self, img, img_target, mask=mask)


def zero0_state(engine, named) -> tuple[dict, dict, dict]:
    """(fp32 weights, exp_avg, exp_avg_sq) by name of a ZeRO-0 engine: fp32 runs step the parameters themselves,
    bf16 runs on the CPU (FP16_UnfusedOptimizer) an fp32 copy of each."""
    opt = engine.optimizer
    if hasattr(opt, 'fp32_groups_flat'):
        return _flat_state(opt, named)
    masters = {}
    if hasattr(opt, 'fp32_groups'):
        for lp_group, fp32_group in zip(opt.fp16_groups, opt.fp32_groups):
            masters.update({id(lp): fp32 for lp, fp32 in zip(lp_group, fp32_group)})
    base = getattr(opt, 'optimizer', opt)
    master = {n: masters.get(id(p), p) for n, p in named}
    online = {n: m.detach().float().clone() for n, m in master.items()}
    moments = ({n: base.state[m][key].clone() for n, m in master.items()} for key in ('exp_avg', 'exp_avg_sq'))
    return online, *moments


def _flat_state(opt, named) -> tuple[dict, dict, dict]:
    """FP16_Optimizer (bf16 with DeepSpeed's FusedAdam): each group's weights and moments are slices of one flat
    fp32 tensor."""
    name_of = {id(p): n for n, p in named}
    out = ({}, {}, {})
    for group, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
        state, offset = opt.optimizer.state[flat], 0
        for p in group:
            for part, whole in zip(out, (flat.detach(), state['exp_avg'], state['exp_avg_sq'])):
                part[name_of[id(p)]] = whole[offset : offset + p.numel()].view(p.shape).clone()
            offset += p.numel()
    return out


def zero_state(engine, named) -> tuple[dict, dict, dict]:
    """The same under ZeRO 1-3 (collective under ZeRO-3: gathers)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, 'single_partition_of_fp32_groups'):  # ZeRO-1/2 link moments to parameters lazily
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        for group, flat in zip(opt.bit16_groups, opt.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(group, flat, opt.optimizer.state)
    online = {n: safe_get_full_fp32_param(p).clone() for n, p in named}
    keys = ('exp_avg', 'exp_avg_sq')
    moments = ({n: safe_get_full_optimizer_state(p, key).clone() for n, p in named} for key in keys)
    return online, *moments


def full_state(engine, model) -> dict:
    """Collective under ZeRO-3 (gathers)."""
    named = list(model.named_parameters())
    if engine.zero_optimization_stage() == 0:
        online, exp_avg, exp_avg_sq = zero0_state(engine, named)
    else:
        online, exp_avg, exp_avg_sq = zero_state(engine, named)
    target = getattr(model, 'target', None)  # MAE mode has no target branch
    out = {
        'online': online,
        'exp_avg': exp_avg,
        'exp_avg_sq': exp_avg_sq,
        'target': {n: t.detach().clone() for n, t in target.state_dict().items()} if target is not None else {},
        'buffers': {n: b.detach().clone() for n, b in model.named_buffers()},
    }
    base = getattr(engine.optimizer, 'optimizer', engine.optimizer)
    steps = {float(s['step']) for s in base.state.values() if 'step' in s}
    out['adam_step'] = sorted(steps)
    out['groups'] = [(g['lr'], g['weight_decay']) for g in base.param_groups]
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--deepspeed_config', required=True)
    parser.add_argument('--out', required=True)
    parser.add_argument('--resume', default='auto')
    parser.add_argument('--record', default='')
    parser.add_argument('--local_rank', type=int, default=None)
    parser.add_argument('overrides', nargs='*')
    args = parser.parse_args()
    CMAE.forward = forward_with_image_masks
    cfg = load_config(None, args.overrides)
    record = {int(s) for s in args.record.split(',') if s}
    seen = {}

    def observer(step, engine, model):
        if 'start' not in seen:
            seen['start'] = step
            if step == 0:  # a fresh run: no optimizer state yet
                return
        if step == seen['start'] or step in record:
            seen[step] = full_state(engine, model)

    train(cfg, args.deepspeed_config, resume=args.resume, observer=observer)
    if dist.get_rank() == 0:
        torch.save(seen, args.out)


if __name__ == '__main__':
    main()
    exit_process(0)  # like the launch scripts: no interpreter finalization with gloo threads alive
