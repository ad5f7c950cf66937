"""`model.compile`: torch.compile applied per transformer block (torchtitan's regional compile) or to the whole model.

Each block is compiled in place (`nn.Module.compile`), so parameter names, state dicts, checkpoints and exported
files are those of the eager model (no `_orig_mod.`), DeepSpeed's ZeRO-1/2 engine wraps the model as usual, and
activation checkpointing recomputes a compiled block. Every per-call choice of the kernels is made before (by
`kernels.resolve`), so a block traces as one graph (`fullgraph=True`), and nothing that differs between blocks is
read inside one (stochastic depth's rates are drawn by the caller, models/vit.py), so all blocks of one shape share
their graphs: one per mode (train, eval, no_grad, with or without drop-path, ...), a handful per shape, counted by
`compiled_graphs`. The recompile limit is raised to cover those (`recompile_limit_for`). If compiling fails at any
call (an old torch, a missing backend or compiler, the recompile limit hit), every compiled region goes back to
eager with one warning line and the step goes on. ZeRO-3's parameter hooks run inside each module's call, where
the compiled code would trace them: refused at start.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ConfigError
from ..kernels import resolve
from ..models.vit import Attention, Block

log = logging.getLogger(__name__)
MODES = ('auto', 'eager', 'blocks', 'model')
# The graphs one block shape may need: train / eval x grad / no_grad x drop-path or not x fp32 / bf16 inputs, so
# that a run's modes never reach the limit; tests/test_compile_lane.py counts what each task really makes.
VARIANTS_PER_SHAPE = 16


@dataclass
class CompileState:
    """What `apply_compile` did: the scope, whether it fell back to eager, and the seconds the first calls took."""

    scope: str = 'eager'
    fallback: str = ''
    compile_s: float = 0.0
    """Wall time of each region's first call (tracing and compiling the forward, and running it once)."""
    regions: list = field(default_factory=list)
    pending: int = 0


def resolve_mode(mode: str, device: torch.device, zero_stage: int = 0) -> str:
    """'auto' -> 'blocks' on CUDA, 'eager' elsewhere (a CPU spends minutes compiling for no measured gain,
    docs/benchmarks.md); ZeRO-3 with compiling asked for is a ConfigError."""
    if mode not in MODES:
        raise ConfigError(f'model.compile {mode!r}: expected one of {", ".join(MODES)}')
    if mode == 'auto':
        mode = 'blocks' if device.type == 'cuda' and zero_stage != 3 else 'eager'
    if mode != 'eager' and zero_stage == 3:
        raise ConfigError(
            'model.compile: ZeRO-3 fetches parameters in module hooks that a compiled block would trace; '
            'use ZeRO-0/1/2 or model.compile=eager'
        )
    return mode


def _modules(model: nn.Module) -> list:
    """The model's modules and CMAE's target branch's, which is kept out of the registered ones."""
    target = getattr(model, 'target', None)
    return list(model.modules()) + (list(target.modules()) if isinstance(target, nn.Module) else [])


def head_dims(model: nn.Module) -> tuple:
    heads = {m.qkv.out_features // 3 // m.num_heads for m in _modules(model) if isinstance(m, Attention)}
    return tuple(sorted(heads))


def apply_compile(model: nn.Module, mode: str, device, zero_stage: int = 0, backend=None, **options) -> CompileState:
    """Compile `model`'s blocks (or all of it) in place, as `mode` says; returns the state the benchmark reports.

    backend: torch.compile's (default: `CMAE_COMPILE_BACKEND`, read here, else 'inductor'; 'aot_eager' traces
    forward and backward the same way without generating code, which is what the CPU tests use).
    """
    backend = backend or os.environ.get('CMAE_COMPILE_BACKEND', '').strip() or 'inductor'
    device = torch.device(device)
    scope = resolve_mode(mode, device, zero_stage)
    state = CompileState(scope=scope)
    # Every kernel choice made now, none inside a compiled graph; a whole model also traces the Triton-backed ops.
    resolve(device, head_dims(model) or (64,), reference=('recon_loss', 'visible_embed') if scope == 'model' else ())
    if scope == 'eager':
        return state
    regions = [m for m in _modules(model) if isinstance(m, Block)] if scope == 'blocks' else [model]
    if not hasattr(nn.Module, 'compile'):
        state.fallback = f'torch {torch.__version__} has no nn.Module.compile'
        log.warning('model.compile=%s: running eager: %s', scope, state.fallback)
        return state
    limit = recompile_limit_for(regions)
    if limit > torch._dynamo.config.recompile_limit:
        torch._dynamo.config.recompile_limit = limit  # process-wide: dynamo counts per code object, not per model
    for region in regions:
        region.compile(backend=backend, fullgraph=scope == 'blocks', **options)
        region._compiled_call_impl = _guarded(region._compiled_call_impl, region, state)
    state.regions, state.pending = regions, len(regions)
    return state


def _shape(region: nn.Module) -> tuple:
    return tuple((name, tuple(p.shape)) for name, p in region.named_parameters())


def recompile_limit_for(regions: list) -> int:
    """Dynamo's per-code-object limit that every region's variants fit in: the blocks of one shape share graphs."""
    return VARIANTS_PER_SHAPE * len({(type(r), _shape(r)) for r in regions})


def compiled_graphs(state: CompileState) -> dict:
    """{region class name: graphs dynamo holds for its forward} (every region of a class shares one code object)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    codes = {type(r).__name__: type(r).forward.__code__ for r in state.regions}
    return {name: len(_debug_get_cache_entry_list(code)) for name, code in codes.items()}


_LIMIT_HIT = getattr(torch._dynamo.exc, 'FailOnRecompileLimitHit', torch._dynamo.exc.TorchDynamoException)


def _compile_errors() -> tuple:
    # FailOnRecompileLimitHit (fullgraph=True past the recompile limit) is an Exception, not a TorchDynamoException
    errors = [torch._dynamo.exc.TorchDynamoException, _LIMIT_HIT]
    try:
        from torch._inductor.exc import InductorError

        errors.append(InductorError)
    except ImportError:
        pass
    return tuple(errors)


class _RecompileLimitNote(logging.Filter):
    """Inside a compiled block's call, dynamo's multi-line warning on hitting the recompile limit is kept back: the
    FailOnRecompileLimitHit that follows is reported by `_fall_back`'s one line, with this warning's last reason."""

    def __init__(self):
        super().__init__()
        self.inside, self.reason = 0, ''

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not self.inside or 'recompile_limit' not in message:
            return True
        self.reason = next((line.strip() for line in message.splitlines() if 'last reason' in line), '')
        return False


_NOTE = _RecompileLimitNote()
logging.getLogger('torch._dynamo.convert_frame').addFilter(_NOTE)


def _guarded(compiled, region: nn.Module, state: CompileState):
    """The compiled call, timed on its first use; a compile error at any call (a recompile's included) sends every
    region back to eager."""
    errors, first = _compile_errors(), [True]

    def attempt(*args, **kwargs):
        _NOTE.inside += 1
        try:
            return compiled(*args, **kwargs)
        except errors as e:
            _fall_back(state, e)
            return region._call_impl(*args, **kwargs)
        finally:
            _NOTE.inside -= 1

    def call(*args, **kwargs):
        if not first[0]:
            return attempt(*args, **kwargs)
        first[0] = False
        t0 = time.perf_counter()
        try:
            return attempt(*args, **kwargs)
        finally:
            state.compile_s += time.perf_counter() - t0
            state.pending -= 1
            if state.pending == 0:
                log.info(
                    'model.compile=%s: first calls of %d regions took %.1f s',
                    state.scope,
                    len(state.regions),
                    state.compile_s,
                )

    return call


def _fall_back(state: CompileState, error: Exception) -> None:
    for region in state.regions:
        region._compiled_call_impl = None
    # dynamo's line, then the cause (the recompile limit's message is in the exception it was raised from)
    limit_hit = isinstance(error, _LIMIT_HIT) and _LIMIT_HIT is not torch._dynamo.exc.TorchDynamoException
    text = f'{error}\n{error.__cause__ or ""}' if limit_hit else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()][:2]
    if limit_hit:
        lines.append(f'(recompile_limit {torch._dynamo.config.recompile_limit}; {_NOTE.reason})')
    state.fallback = f'{type(error).__name__}: {" ".join(lines)}'
    log.warning('model.compile=%s failed, running eager: %s', state.scope, state.fallback[:400])
