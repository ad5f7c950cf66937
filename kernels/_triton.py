"""When a Triton kernel can run on given tensors.

Triton decides at decoration time whether a kernel is compiled for the GPU or run by its CPU interpreter
(`TRITON_INTERPRET=1`), so the kernel modules are imported lazily and the decision is read off the kernel object
itself rather than off the environment, which may have changed since.
"""

import functools
import importlib

import torch

from ._switch import fused_enabled, on_configure


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    try:
        importlib.import_module('triton')
        return True
    except ImportError:
        return False


def is_interpreted(kernel) -> bool:
    """True if `kernel` (a @triton.jit function) is run by the interpreter on CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def can_run(kernel, *tensors) -> bool:
    """A compiled kernel needs CUDA tensors; the interpreter takes CPU (or CUDA) tensors."""
    if is_interpreted(kernel):
        return True
    return all(t.is_cuda for t in tensors)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


_table: dict = {}  # (op, device type) -> the fused module or None; emptied by kernels.configure
on_configure(_table.clear)


def load_fused(op: str, package: str, *tensors):
    """The `fused` module of `op`, or None when the switch is off, Triton is missing, or its kernel cannot run on
    `tensors` (a compiled kernel given CPU tensors). Decided once per op and device type: a compiled forward then
    reads a dict entry instead of importing (which would break its graph)."""
    key = (op, tensors[0].device.type)
    if key not in _table:
        _table[key] = _fused_module(op, package, *tensors)
    return _table[key]


def pin_reference(op: str, device) -> None:
    """`op` takes its reference on `device`'s type until the next `kernels.configure`."""
    _table[(op, torch.device(device).type)] = None


def _fused_module(op: str, package: str, *tensors):
    if not (fused_enabled(op) and has_triton()):
        return None
    mod = importlib.import_module('.fused', package)
    return mod if can_run(mod.KERNEL, *tensors) else None
