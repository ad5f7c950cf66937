"""Fusion switches, the attention backend, and the record of which implementation ran.

The switches are process state set once at start: `configure(...)` from the run's `kernels` config section, with
the environment as an override read at that moment (`CMAE_FUSED=0` turns every fusion off, `CMAE_FUSED_<OP>=0`
one op (ATTENTION, ADAMW, RECON_LOSS, EMA, VISIBLE_EMBED), `CMAE_ATTN_BACKEND=fa3|fa2|sdpa|math` forces a
backend). At import the defaults plus the environment apply, so a plain script honours the variables too.
`configured(...)` switches temporarily (benchmarks comparing fused with unfused, tests).
"""

import dataclasses
import os
from contextlib import contextmanager

OPS = ('attention', 'adamw', 'recon_loss', 'ema', 'visible_embed')
_OFF = {'0', 'false', 'off', 'no'}
_last: dict = {}
_on_configure: list = []


@dataclasses.dataclass(frozen=True)
class KernelSettings:
    fused: bool = True
    """False: every op runs its plain PyTorch reference (attention: 'math')."""
    off: frozenset = frozenset()
    """Ops (of OPS) whose fusion is off."""
    attention_backend: str = 'auto'


def _env_off(name: str) -> bool:
    return os.environ.get(name, '1').strip().lower() in _OFF


def _with_environment(s: KernelSettings) -> KernelSettings:
    off = set(s.off) | {op for op in OPS if _env_off(f'CMAE_FUSED_{op.upper()}')}
    backend = os.environ.get('CMAE_ATTN_BACKEND', '').strip().lower() or s.attention_backend
    return KernelSettings(fused=s.fused and not _env_off('CMAE_FUSED'), off=frozenset(off), attention_backend=backend)


_settings = _with_environment(KernelSettings())


def configure(fused: bool = True, off=(), attention_backend: str = 'auto', environment: bool = True) -> KernelSettings:
    """Set the switches of this process; the environment, when `environment`, overrides the arguments."""
    unknown = set(off) - set(OPS)
    if unknown:
        raise ValueError(f'unknown kernel op(s) {sorted(unknown)}; ops: {OPS}')
    s = KernelSettings(fused=fused, off=frozenset(off), attention_backend=attention_backend.strip().lower())
    _set(_with_environment(s) if environment else s)
    return _settings


def _set(s: KernelSettings) -> None:
    global _settings
    _settings = s
    for forget in _on_configure:
        forget()


def on_configure(forget) -> None:
    """Call `forget()` whenever the switches change: the ops' tables of resolved choices empty themselves."""
    _on_configure.append(forget)


def settings() -> KernelSettings:
    return _settings


@contextmanager
def configured(**kw):
    """The switches as `configure(**kw)` says, then back to what they were."""
    saved = _settings
    try:
        yield configure(**kw)
    finally:
        _set(saved)


def fused_enabled(op: str) -> bool:
    """True unless fusion is off for every op or for `op`."""
    return _settings.fused and op not in _settings.off


def record(op: str, impl: str) -> None:
    """Remember which implementation ran for `op` (a dict store: no cost worth measuring)."""
    _last[op] = impl


def last_impl(op: str):
    """Name of the implementation that ran last for `op` ('triton', 'reference', 'sdpa', ...), or None."""
    return _last.get(op)
