"""Counting host reads: every way a tensor's value reaches Python, seen by two modes at once.

`TorchFunctionMode` sees the Python-level calls (`item`, `bool()`, `float()`, `int()`, `tolist`, `cpu`, `numpy`,
a `to()`/`copy_` from a device to the host); `TorchDispatchMode` sees `aten._local_scalar_dense`, the one kernel
every scalar read ends in (torch/_subclasses/fake_tensor.py treats it as the data-dependent read), also under
`torch._C.DisableTorchFunction`, which hides calls from the function mode: a scalar read that did not pass
through the function mode is counted there. Each read is attributed to the first frame outside torch.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

T = torch.Tensor
READS = {T.item, T.__bool__, T.__float__, T.__int__, T.__index__, T.tolist, T.cpu, T.numpy}
TORCH = str(Path(torch.__file__).parent)


def _to_host(func, args, kwargs) -> bool:
    """A copy from a device to the host that blocks: `to('cpu')`/`copy_` without non_blocking."""
    if func not in (T.to, T.copy_) or kwargs.get('non_blocking') or not args:
        return False
    if func is T.copy_:
        return len(args) > 1 and args[0].device.type == 'cpu' and args[1].device.type != 'cpu'
    target = [a for a in args[1:] if isinstance(a, (str, torch.device))] + [kwargs.get('device')]
    return args[0].device.type != 'cpu' and any(t is not None and torch.device(t).type == 'cpu' for t in target)


def _where() -> str:
    for frame in reversed(traceback.extract_stack()[:-1]):
        if not frame.filename.startswith(TORCH) and not frame.filename.endswith('host_read_helpers.py'):
            return f'{frame.filename}:{frame.lineno} {frame.name}'
    return '?'


class HostReads:
    """`with HostReads() as reads:` ... `reads.log` lists (where, what) in order; `mark()` cuts the log."""

    def __init__(self):
        self.log: list[tuple[str, str]] = []
        self._inside = 0
        counter = self

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in READS or _to_host(func, args, kwargs):
                    counter.log.append((_where(), getattr(func, '__name__', str(func))))
                    counter._inside += 1
                    try:
                        return func(*args, **kwargs)
                    finally:
                        counter._inside -= 1
                return func(*args, **kwargs)

        class Kernels(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default and not counter._inside:
                    counter.log.append((_where(), 'aten._local_scalar_dense (past the function mode)'))
                return func(*args, **(kwargs or {}))

        self._modes = (Functions(), Kernels())

    def __enter__(self) -> 'HostReads':
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def mark(self) -> list:
        """The reads since the last mark."""
        taken, self.log = self.log, []
        return taken


def by_place(reads: list) -> Counter:
    return Counter(f'{where} ({what})' for where, what in reads)
