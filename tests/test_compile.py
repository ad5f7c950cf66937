"""Compile-clean models and the model.compile switch (cmae_ds.engine.compile).

Traced with dynamo and compiled with the 'eager'/'aot_eager' backends: the tracing and the autograd graph are the
ones inductor would get, without minutes of C++ compiling on a CPU.
"""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from cmae_ds.config import ConfigError, ModelConfig
from cmae_ds.engine.compile import VARIANTS_PER_SHAPE, apply_compile, compiled_graphs, head_dims, resolve_mode
from cmae_ds.kernels import configure as configure_kernels
from cmae_ds.kernels import resolve
from cmae_ds.modelfiles.model_file import read_model_file, run_model_file
from cmae_ds.models import CMAE, ViTClassifier, build_probe
from cmae_ds.models.vit import Block

# What model.compile=model pins (engine.compile.apply_compile): the Triton interpreter (TRITON_INTERPRET=1 in the
# tests) cannot be traced.
WHOLE_MODEL_REFERENCE = ('recon_loss', 'visible_embed')
INTERPRETED = ('recon_loss', 'visible_embed', 'ema')


@pytest.fixture(autouse=True)
def _fresh_kernel_tables():
    yield
    configure_kernels()  # the pinned choices last until the next configure


def _cfg(mode='cmae'):
    return ModelConfig(size='debug', img_size=32, patch_size=8, mode=mode)


def _explain(fn, *args):
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args)


def _matrix(*combos, everyday):
    """Every combination; those not in `everyday` in the slow lane (each explain costs seconds on a 2-core CPU)."""
    return [pytest.param(*c, marks=() if c in everyday else pytest.mark.slow) for c in combos]


@pytest.mark.parametrize(
    'mode, bf16, train',
    _matrix(
        *[(m, b, t) for m in ('cmae', 'mae') for b in (False, True) for t in (True, False)],
        everyday=[('cmae', True, True), ('mae', False, False)],
    ),
)
def test_pretraining_models_trace_as_one_graph(mode, bf16, train):
    torch.manual_seed(0)
    model = CMAE(_cfg(mode)).train(train)
    resolve('cpu', head_dims(model), reference=WHOLE_MODEL_REFERENCE)
    img, mask = torch.randn(2, 3, 32, 32), model.random_mask(2, 'cpu')

    def step(img, mask):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            return model(img, img, mask=mask)['loss']

    e = _explain(step, img, mask)
    assert (e.graph_count, e.graph_break_count) == (1, 0), [str(b.reason)[:200] for b in e.break_reasons]


@pytest.mark.parametrize(
    'which, bf16',
    _matrix(*[(w, b) for w in ('classifier', 'probe') for b in (False, True)], everyday=[('classifier', True)]),
)
def test_classification_models_trace_as_one_graph(which, bf16):
    cfg = _cfg()
    model = ViTClassifier(cfg, 5) if which == 'classifier' else build_probe(cfg, 5)
    resolve('cpu', head_dims(model), reference=WHOLE_MODEL_REFERENCE)
    for train in (True, False):
        model.train(train)

        def fwd(img):
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
                return model(img)

        e = _explain(fwd, torch.randn(2, 3, 32, 32))
        assert (e.graph_count, e.graph_break_count) == (1, 0), [str(b.reason)[:200] for b in e.break_reasons]


def _steps(model, n, seed=0):
    """n AdamW steps on fixed random batches; returns the losses and the last step's gradients."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    g, losses = torch.Generator().manual_seed(seed), []
    for _ in range(n):
        img = torch.randn(2, 3, 32, 32, generator=g)
        mask = model.random_mask(2, 'cpu', g)
        opt.zero_grad()
        loss = model(img, img, mask=mask)['loss']
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow  # ~1-2 min here: 42 training steps
def test_compiled_blocks_match_eager_and_do_not_recompile():
    configure_kernels(off=INTERPRETED, environment=False)  # the Triton interpreter: seconds a step, beside the point
    torch.manual_seed(0)
    eager = CMAE(_cfg())
    compiled = CMAE(_cfg())
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    counters.clear()
    state = apply_compile(compiled, 'blocks', 'cpu', backend='aot_eager')
    assert state.scope == 'blocks' and len(state.regions) == 6  # online 2 + 1 + 1 decoder blocks, target 2
    _steps(compiled, 1)
    graphs = counters['stats']['unique_graphs']
    assert graphs >= 1 and state.compile_s > 0 and not state.fallback
    losses, grads = _steps(compiled, 20, seed=1)
    assert counters['stats']['unique_graphs'] == graphs  # 20 more steps: no recompilation
    _steps(eager, 1)
    want_losses, want_grads = _steps(eager, 20, seed=1)
    torch.testing.assert_close(losses, want_losses, rtol=1e-4, atol=1e-5)
    assert grads.keys() == want_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], want_grads[k], rtol=1e-3, atol=1e-5, msg=k)


def test_state_dicts_are_interchangeable():
    torch.manual_seed(0)
    a = CMAE(_cfg())
    apply_compile(a, 'blocks', 'cpu', backend='eager')
    b = CMAE(_cfg())
    assert list(a.state_dict()) == list(b.state_dict())
    assert not any('_orig_mod' in k for k in a.state_dict())
    b.load_state_dict(a.state_dict())
    a.load_state_dict(b.state_dict())


def test_zero3_refused_and_auto_is_off_on_the_cpu():
    assert resolve_mode('auto', torch.device('cpu')) == 'eager'
    assert resolve_mode('auto', torch.device('cuda', 0), zero_stage=3) == 'eager'
    assert resolve_mode('auto', torch.device('cuda', 0)) == 'blocks'
    with pytest.raises(ConfigError, match='ZeRO-3'):
        resolve_mode('blocks', torch.device('cpu'), zero_stage=3)
    with pytest.raises(ConfigError, match='model.compile'):
        ModelConfig(size='debug', compile='yes')


def _broken_backend(gm, example_inputs):
    raise RuntimeError('no compiler here')


def test_a_compile_failure_falls_back_to_eager_with_one_warning(caplog):
    configure_kernels(off=INTERPRETED, environment=False)
    torch.manual_seed(0)
    model = CMAE(_cfg())
    want = CMAE(_cfg())
    want.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    state = apply_compile(model, 'blocks', 'cpu', backend=_broken_backend)
    img = torch.randn(2, 3, 32, 32)
    mask = model.random_mask(2, 'cpu', torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger='cmae_ds.engine.compile'):
        got = model(img, img, mask=mask)['loss']
        model(img, img, mask=mask)
    assert [r.levelname for r in caplog.records] == ['WARNING'] and 'running eager' in caplog.records[0].message
    assert 'no compiler here' in state.fallback
    torch.testing.assert_close(got, want(img, img, mask=mask)['loss'])


@pytest.mark.slow  # two single-process DeepSpeed runs of 3 steps
def test_pretraining_compiled_under_zero2_bf16_matches_eager(tmp_path):
    """Through the real DeepSpeed engine (ZeRO-2, bf16): blocks compiled before deepspeed.initialize, the model
    file has the eager names, and the weights end where an eager run's do. (ZeRO-3: test_zero3_refused...)"""
    from engine_helpers import TINY, run_python, tail, write_ds

    def run(name, compile_mode):
        ds = write_ds(tmp_path, f'{name}.json', bf16={'enabled': True}, zero_optimization={'stage': 2})
        args = ['launch/pretrain.py', '--deepspeed_config', ds, *TINY, 'train.max_steps=3', 'train.epochs=10']
        args += ['train.warmup_epochs=1', 'train.save_every_steps=0', f'train.output_dir={tmp_path / name}']
        return run_python(args + [f'model.compile={compile_mode}'], extra_env={'CMAE_COMPILE_BACKEND': 'eager'})

    compiled, eager = run('compiled', 'blocks'), run('eager', 'eager')
    assert compiled.returncode == 0 and eager.returncode == 0, tail(compiled) + tail(eager)
    a, b = [read_model_file(run_model_file(tmp_path / n))['state_dict'] for n in ('compiled', 'eager')]
    assert a.keys() == b.keys() and not any('_orig_mod' in k for k in a)
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-2, atol=1e-3, msg=k)


def _classifier_steps(model, n, batch=2):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(batch, 3, 32, 32, generator=g)).logsumexp(1).mean().backward()
        opt.step()


def test_a_12_block_classifier_with_drop_path_stays_compiled_past_its_first_step(caplog):
    """ViT-B/L fine-tuning's shape of the model: twelve blocks, drop-path 0.1 (twelve rates). Each rate read inside
    a compiled block was a constant dynamo guarded on: a graph per block, FailOnRecompileLimitHit at the ninth."""
    configure_kernels(off=INTERPRETED, environment=False)
    torch.manual_seed(0)
    model = ViTClassifier(ModelConfig(size='debug', img_size=32, patch_size=8, depth=12), 5, drop_path=0.1).train()
    torch._dynamo.reset()
    state = apply_compile(model, 'blocks', 'cpu', backend='eager')
    with caplog.at_level(logging.WARNING):
        _classifier_steps(model, 2)
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
    assert not state.fallback and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert all(b._compiled_call_impl is not None for b in state.regions)  # still compiled, no fall-back
    graphs = compiled_graphs(state)['Block']
    assert 1 <= graphs <= 4, graphs  # train without drop-path (block 0, rate 0), train with, eval; not one per block


def test_a_recompile_storm_falls_back_to_eager_with_one_warning(caplog):
    """Planted: each block draws stochastic depth at its own Python rate inside its compiled call, as it once did,
    over more blocks than the recompile limit holds: fullgraph=True then raises FailOnRecompileLimitHit (an
    Exception, not a dynamo one) at the first block past the limit."""
    configure_kernels(off=INTERPRETED, environment=False)
    cfg = ModelConfig(size='debug', img_size=32, patch_size=8, depth=VARIANTS_PER_SHAPE + 2)
    torch.manual_seed(0)
    model = ViTClassifier(cfg, 5).train()
    want = ViTClassifier(cfg, 5).train()
    want.load_state_dict(model.state_dict())
    forward = Block.forward

    def guarded_per_block(self, x, *keeps):
        keep = 1.0 - self.rate  # bernoulli_ needs it concrete: dynamo guards on its value
        return forward(self, x * x.new_empty(x.shape[0], 1, 1).bernoulli_(keep).div_(keep), *keeps)

    for m in (model, want):
        for i, block in enumerate(m.encoder.blocks):
            block.rate = i / 100
    torch._dynamo.reset()
    state = apply_compile(model, 'blocks', 'cpu', backend='eager')
    img = torch.randn(2, 3, 32, 32)
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.WARNING):
        mp.setattr(Block, 'forward', guarded_per_block)
        torch.manual_seed(1)
        got = model(img)
        model(img).sum().backward()
        torch.manual_seed(1)
        expected = want(img)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in warnings] == ['cmae_ds.engine.compile'], [r.getMessage()[:200] for r in warnings]
    assert 'FailOnRecompileLimitHit' in state.fallback and 'recompile limit' in state.fallback, state.fallback
    assert all(b._compiled_call_impl is None for b in state.regions)
    torch.testing.assert_close(got, expected)
