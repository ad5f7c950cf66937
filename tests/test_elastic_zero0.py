"""The ZeRO-0 side of a resume on another ZeRO stage (engine/checkpoints/elastic_zero0.py), on DeepSpeed's real ZeRO-0
optimizers without a process group: the flat FP16_Optimizer (the GPU form, FusedAdam under bf16/fp16) and a
plain fp32 torch AdamW. A checkpoint's optimizer state goes through the universal folder into a freshly built
optimizer of the same form and must come back equal. The per-rank FP16_UnfusedOptimizer (the CPU form) needs a
process group: tests/test_elastic.py runs it under the DeepSpeed launcher, with ZeRO 1-3 on the other side."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cmae_ds.config import ConfigError
from cmae_ds.engine.checkpoints import elastic_zero0


def _module(seed: int, dtype) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2)).to(dtype)


def _groups(m: torch.nn.Module) -> list[dict]:
    decay = [m[0].weight, m[2].weight]
    return [
        {'params': decay, 'weight_decay': 0.05},
        {'params': [p for p in m.parameters() if all(p is not d for d in decay)], 'weight_decay': 0.0},
    ]


def _engine(form: str, seed: int) -> SimpleNamespace:
    m = _module(seed, torch.bfloat16 if form == 'flat' else torch.float32)
    optimizer = torch.optim.AdamW(_groups(m), lr=1e-2, betas=(0.9, 0.95), foreach=True)
    if form == 'flat':
        from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
        from deepspeed.runtime.fp16.loss_scaler import LossScaleConfig

        scale = LossScaleConfig(torch.bfloat16, dynamic_loss_scale=False, static_loss_scale=1.0, dynamic_loss_args=None)
        optimizer = FP16_Optimizer(optimizer, loss_scale_config=scale, low_precision_dtype=torch.bfloat16)
    return SimpleNamespace(module=m, optimizer=optimizer, zero_optimization_stage=lambda: 0, train_batch_size=lambda: 8)


def _train(engine, steps: int) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in engine.module.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        engine.optimizer.step()


def _states(engine) -> dict:
    return {
        'module': engine.module.state_dict(),
        'optimizer': engine.optimizer.state_dict(),
        'global_steps': 3,
        'skipped_steps': 0,
        'ds_version': '0.19.8',
        'progress': {'step': 3},
        **elastic_zero0.names_entry(engine),
    }


def _masters(engine) -> list[torch.Tensor]:
    opt = engine.optimizer
    return [t.clone() for t in getattr(opt, 'fp32_groups_flat', list(engine.module.parameters()))]


def _moments(engine) -> list[dict]:
    base = getattr(engine.optimizer, 'optimizer', engine.optimizer)
    return [
        {k: (v.clone() if torch.is_tensor(v) else v) for k, v in base.state[p].items()}
        for g in base.param_groups
        for p in g['params']
    ]


@pytest.mark.parametrize('form', ['flat', 'plain'])
def test_zero0_optimizer_state_round_trips_through_the_universal_folder(tmp_path: Path, form: str):
    saved = _engine(form, seed=0)
    _train(saved, 3)
    assert elastic_zero0.saved_form(saved.optimizer.state_dict()) == elastic_zero0.live_form(saved) == form
    elastic_zero0.write_universal(_states(saved), tmp_path / 'ckpt', tmp_path / 'universal')
    names = {p.name for p in (tmp_path / 'universal' / 'zero').iterdir() if p.is_dir()}
    assert names == {n for n, _ in saved.module.named_parameters()}
    weight = torch.load(tmp_path / 'universal' / 'zero' / '0.weight' / 'fp32.pt', weights_only=False)['param']
    assert weight.dtype == torch.float32 and weight.shape == (3, 4)

    fresh = _engine(form, seed=1)  # other weights, no optimizer state
    states = torch.load(tmp_path / 'universal' / 'mp_rank_00_model_states.pt', weights_only=False)
    client = elastic_zero0.load_universal(fresh, tmp_path / 'universal', states)
    assert client['progress'] == {'step': 3} and fresh.global_steps == 3
    for a, b in zip(_masters(saved), _masters(fresh)):
        assert torch.equal(a, b)
    for a, b in zip(saved.module.parameters(), fresh.module.parameters()):
        assert torch.equal(a, b)  # the bf16 weights follow their fp32 masters
    for a, b in zip(_moments(saved), _moments(fresh)):
        assert a.keys() == b.keys()
        for key in ('exp_avg', 'exp_avg_sq'):
            assert torch.equal(a[key], b[key]), key
        assert float(a['step']) == float(b['step']) and type(a['step']) is type(b['step'])
    _train(saved, 1)
    _train(fresh, 1)  # the restored state steps on: the same update from the same gradients
    for a, b in zip(_masters(saved), _masters(fresh)):
        assert torch.equal(a, b)


def test_checkpoint_without_parameter_names_is_refused_with_what_to_do(tmp_path: Path):
    saved = _engine('plain', seed=0)
    _train(saved, 1)
    states = _states(saved)
    del states[elastic_zero0.NAMES]
    with pytest.raises(ConfigError, match='resume it on ZeRO-0 and save once'):
        elastic_zero0.write_universal(states, tmp_path / 'ckpt', tmp_path / 'universal')


def test_other_optimizer_state_is_refused_not_dropped(tmp_path: Path):
    """Momentum SGD/LARS state has no place in the universal format."""
    m = _module(0, torch.float32)
    sgd = torch.optim.SGD(_groups(m), lr=0.1, momentum=0.9)
    engine = SimpleNamespace(module=m, optimizer=sgd, zero_optimization_stage=lambda: 0)
    _train(engine, 1)
    with pytest.raises(ConfigError, match='no step count'):
        elastic_zero0.write_universal(_states(engine), tmp_path / 'ckpt', tmp_path / 'universal')


def test_sizes_that_do_not_match_the_names_are_refused(tmp_path: Path):
    saved = _engine('flat', seed=0)
    _train(saved, 1)
    states = _states(saved)
    names = states[elastic_zero0.NAMES]
    states[elastic_zero0.NAMES] = [names[0][:1], names[1]]
    with pytest.raises(ConfigError, match='group 0 holds 18 values'):
        elastic_zero0.write_universal(states, tmp_path / 'ckpt', tmp_path / 'universal')


def test_the_step_deepspeed_takes_when_building_a_zero0_bf16_optimizer_is_undone():
    """FP16_Optimizer creates its state by stepping on zero gradients: AdamW decays the masters once and counts a
    step. Undone, the first real step is AdamW's first step from the initial weights, as in fp32."""
    from cmae_ds.engine.optim import undo_initial_step

    engine = _engine('flat', seed=0)
    lp = [p.detach().float().clone() for p in engine.module.parameters()]
    flat = engine.optimizer.fp32_groups_flat
    assert len(engine.optimizer.optimizer.state) == 2  # what DeepSpeed did: one state per flat group, step 1
    assert not torch.equal(flat[0][:12], lp[0].reshape(-1))  # 0.weight, decayed by lr x weight decay
    undo_initial_step(engine)
    assert len(engine.optimizer.optimizer.state) == 0
    reference = _module(0, torch.bfloat16).float()
    ref = torch.optim.AdamW(_groups(reference), lr=1e-2, betas=(0.9, 0.95), foreach=True)
    _train(engine, 1)
    gen = torch.Generator().manual_seed(1)  # _train's gradients, rounded to bf16 as the engine's are
    for p in reference.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16).float()
    ref.step()
    by_name = dict(reference.named_parameters())
    for names, master in zip(elastic_zero0.param_names(engine), flat):
        expected = torch.cat([by_name[n].detach().reshape(-1) for n in names])
        assert torch.equal(master, expected)
