"""The EMA from DeepSpeed's fp32 master weights (kernels/ema/master.py, kernels/ema/zero3.py) on the real engine
(gloo, debug CMAE): under ZeRO-1/2/3 in bf16 and fp32 the target moves towards the master each parameter's fp32 value
as DeepSpeed's own accessor returns it (`deepspeed.utils.safe_get_full_fp32_param`, deepspeed/utils/
tensor_fragment.py), not towards the bf16 weights, in one update per parameter group. ZeRO-3 also on three ranks,
where most of the debug model's tensors split unevenly and the last rank's partitions are padded."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from deepspeed.utils import safe_get_full_fp32_param

from cmae_ds.config import load_config
from cmae_ds.config.ds_config import validate
from cmae_ds.engine import torch_globals
from cmae_ds.engine.dist import setup_distributed
from cmae_ds.kernels import last_impl
from cmae_ds.tasks.pretrain import build_engine, train_step

from engine_helpers import TINY
from helpers import free_port
from run_recorder import one_rank_group

pytestmark = [pytest.mark.slow]
CASES = [(1, 'bf16'), (2, 'bf16'), (2, 'fp32'), (3, 'bf16'), (3, 'fp32')]


@pytest.mark.parametrize('stage,precision', CASES, ids=[f'zero{s}-{p}' for s, p in CASES])
def test_target_follows_the_fp32_master(stage, precision):
    with one_rank_group(), torch_globals.restored():
        ctx = setup_distributed()
        one_update(ctx, stage, precision)


@pytest.mark.dist
def test_zero3_on_three_ranks_with_padded_partitions():
    mp.spawn(_rank, args=(3, free_port()), nprocs=3, join=True)


def _rank(rank, world, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR='127.0.0.1')
    os.environ['MASTER_PORT'] = str(port)
    ctx = setup_distributed()
    padded = one_update(ctx, 3, 'bf16')
    assert padded > 10, padded  # most tensors were split unevenly
    torch.distributed.barrier()  # leave together: a rank tearing gloo down aborts a peer still in a collective
    torch.distributed.destroy_process_group()


def one_update(ctx, stage, precision) -> int:
    """One training step, then one EMA update checked against DeepSpeed's fp32 master; the number of online
    weights whose partitions are padded."""
    cfg = load_config(None, TINY)
    ds = {
        'train_micro_batch_size_per_gpu': 2,
        'gradient_accumulation_steps': 1,
        'zero_optimization': {'stage': stage},
        'steps_per_print': 10**9,
        **({'bf16': {'enabled': True, 'check_grad_overflow': False}} if precision == 'bf16' else {}),
    }
    dtype = torch.bfloat16 if precision == 'bf16' else torch.float32
    engine, model, _ = build_engine(cfg, ds, validate(ds, cfg, ctx.world_size, path='test'), ctx, 1e-2)
    assert model._master_ema is not None, 'the master EMA was not taken'
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(ctx.rank))
    train_step(engine, {'img': img, 'img_target': img}, dtype)
    targets, online = model.ema_pairs()
    before = [t.detach().clone() for t in targets]
    masters = [safe_get_full_fp32_param(o) for o in online]
    bf16 = [gathered(o, stage) for o in online]
    model.momentum_update(0.75)
    assert last_impl('ema') in ('master', 'master_triton')
    moved_to_bf16 = False
    for t, b, master, w in zip(targets, before, masters, bf16):
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, b.lerp(master, 0.25), rtol=0, atol=1e-7)
        moved_to_bf16 |= not torch.equal(t, b.lerp(w, 0.25))
    assert moved_to_bf16 == (precision == 'bf16')
    return sum(getattr(o, 'ds_numel', o.numel()) % ctx.world_size != 0 for o in online)


def gathered(online, stage) -> torch.Tensor:
    """The training-dtype weight in fp32, whole (ZeRO-3 gathers it: a collective, every rank calls it)."""
    if stage != 3:
        return online.detach().float()
    import deepspeed

    with deepspeed.zero.GatheredParameters([online]):
        return online.detach().float().clone()
