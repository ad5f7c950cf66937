"""Kill switches and the record of which implementation ran.

`CMAE_FUSED=0` turns every fusion off; `CMAE_FUSED_<OP>=0` (OP in ATTENTION, ADAMW, RECON_LOSS, EMA,
VISIBLE_EMBED) turns one off. The variables are read at call time, so a test or a debugging session can flip them
without re-importing anything.
"""
import os

_OFF = {"0", "false", "off", "no"}
_last: dict = {}


def _is_off(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() in _OFF


def fused_enabled(op: str) -> bool:
    """True unless `CMAE_FUSED` or `CMAE_FUSED_<OP>` is set to 0/false/off/no."""
    return not (_is_off("CMAE_FUSED") or _is_off(f"CMAE_FUSED_{op.upper()}"))


def record(op: str, impl: str) -> None:
    """Remember which implementation ran for `op` (a dict store: no cost worth measuring)."""
    _last[op] = impl


def last_impl(op: str):
    """Name of the implementation that ran last for `op` ('triton', 'reference', 'sdpa', ...), or None."""
    return _last.get(op)
