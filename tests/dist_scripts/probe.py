"""Run under the DeepSpeed launcher by tests/test_engine_dist.py; writes what it saw to --out on rank 0.

--mode ema   train() for a few steps and record the full online weights after every optimizer step
--mode loss  one step of the real engine on a fixed global batch split across ranks; record loss and gradients
"""

import argparse

import torch
import torch.distributed as dist

from cmae_ds.config import load_config
from cmae_ds.config.ds_config import load_ds_config, validate
from cmae_ds.engine.dist import setup_distributed
from cmae_ds.tasks.pretrain import build_engine, train


def full_state(model, zero_stage):
    """Online parameters as full fp32 tensors (gathered under ZeRO-3); under ZeRO-1/2 the optimizer's fp32 master,
    which the EMA reads there (kernels/ema/master.py), as DeepSpeed's own accessor gathers it; collective."""
    params = list(model.named_parameters())
    if zero_stage in (1, 2):
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).detach().float().clone() for n, p in params}
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {n: p.detach().float().clone() for n, p in params}
    return {n: p.detach().float().clone() for n, p in params}


def run_ema(cfg, ds_path, out):
    stage = load_ds_config(ds_path).get('zero_optimization', {}).get('stage', 0)
    seen, target, start = [], {}, {}

    def observer(step, engine, model):
        seen.append((step, full_state(model, stage)))
        target.update({n: p.detach().clone() for n, p in model.target.named_parameters()})
        if not start:
            start.update(target)

    train(cfg, ds_path, resume='none', observer=observer)
    if dist.get_rank() == 0:
        torch.save({'online': seen, 'target': target, 'target_start': start}, out)


def run_loss(cfg, ds_path, out):
    ds = load_ds_config(ds_path)
    ctx = setup_distributed()
    batch_cfg = validate(ds, cfg, ctx.world_size, path=ds_path)
    engine, model, _ = build_engine(cfg, ds, batch_cfg, ctx, peak_lr=1e-3)
    gen = torch.Generator().manual_seed(123)
    n, s = batch_cfg.global_batch, cfg.model.img_size
    img, img_t = torch.randn(n, 3, s, s, generator=gen), torch.randn(n, 3, s, s, generator=gen)
    mask = model.random_mask(n, 'cpu', generator=gen)
    part = slice(ctx.rank * batch_cfg.micro_batch, (ctx.rank + 1) * batch_cfg.micro_batch)
    out_dict = engine(img[part], img_t[part], mask=mask[part])
    loss = out_dict['loss'].detach().clone()
    engine.backward(out_dict['loss'])
    grads = full_grads(model)
    engine.step()
    dist.all_reduce(loss)
    if ctx.rank == 0:
        torch.save({'loss': loss / ctx.world_size, 'grads': grads}, out)


def full_grads(model):
    """Averaged full gradients as the optimizer will see them (collective; works under every ZeRO stage)."""
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p).detach().float().clone() for n, p in model.named_parameters()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--mode', choices=['ema', 'loss'], required=True)
    parser.add_argument('--deepspeed_config', required=True)
    parser.add_argument('--out', required=True)
    parser.add_argument('--local_rank', type=int, default=None)
    parser.add_argument('overrides', nargs='*')
    args = parser.parse_args()
    cfg = load_config(None, args.overrides)
    (run_ema if args.mode == 'ema' else run_loss)(cfg, args.deepspeed_config, args.out)


if __name__ == '__main__':
    main()
