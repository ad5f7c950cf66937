"""The EMA from DeepSpeed's fp32 master weights (kernels/ema/master.py) on the real engine (one rank, gloo, debug
CMAE): under ZeRO-1/2 in bf16 and fp32 the target moves towards the master each parameter's fp32 value as DeepSpeed's
own accessor returns it (`deepspeed.utils.safe_get_full_fp32_param`, deepspeed/utils/tensor_fragment.py), not
towards the bf16 weights, in one update per parameter group."""

import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param

from cmae_ds.config import load_config
from cmae_ds.config.ds_config import validate
from cmae_ds.engine.dist import setup_distributed
from cmae_ds.kernels import last_impl
from cmae_ds.tasks.pretrain import build_engine, train_step

from engine_helpers import TINY
from run_recorder import one_rank_group

pytestmark = [pytest.mark.slow]
CASES = [(1, 'bf16'), (2, 'bf16'), (2, 'fp32')]


@pytest.mark.parametrize('stage,precision', CASES, ids=[f'zero{s}-{p}' for s, p in CASES])
def test_target_follows_the_fp32_master(stage, precision):
    cfg = load_config(None, TINY)
    ds = {
        'train_micro_batch_size_per_gpu': 2,
        'gradient_accumulation_steps': 1,
        'zero_optimization': {'stage': stage},
        'steps_per_print': 10**9,
        **({'bf16': {'enabled': True, 'check_grad_overflow': False}} if precision == 'bf16' else {}),
    }
    dtype = torch.bfloat16 if precision == 'bf16' else torch.float32
    with one_rank_group():
        ctx = setup_distributed()
        engine, model, _ = build_engine(cfg, ds, validate(ds, cfg, 1, path='test'), ctx, 1e-2)
        assert model._master_ema is not None, 'the master EMA was not taken'
        img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        train_step(engine, {'img': img, 'img_target': img}, dtype)
        targets, online = model.ema_pairs()
        before = [t.detach().clone() for t in targets]
        masters = [safe_get_full_fp32_param(o) for o in online]
        model.momentum_update(0.75)
        assert last_impl('ema') in ('master', 'master_triton')
        moved_to_bf16 = False
        for t, b, master, o in zip(targets, before, masters, online):
            assert t.dtype == torch.float32
            torch.testing.assert_close(t, b.lerp(master, 0.25), rtol=0, atol=1e-7)
            moved_to_bf16 |= not torch.equal(t, b.lerp(o.detach().float(), 0.25))
        assert moved_to_bf16 == (precision == 'bf16')
