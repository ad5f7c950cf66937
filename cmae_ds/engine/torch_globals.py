"""What DeepSpeed changes in torch for the whole process, put back when a run ends.

ZeRO-3's engine replaces `torch.nn.functional.linear` with its memory-efficient `zero3_linear_wrap` (and, with
quantized initialization, `functional.embedding`) and never restores it: DeepSpeed 0.19's
runtime/zero/partition_parameters.py says so in its own log line, "This will persist unless manually reset".
Anything the process does after a ZeRO-3 run then goes through DeepSpeed's autograd function: a second run built in
the same process (a notebook, a sweep, the test suite), and `torch.jit.script` of any nn.Linear, which fails with
"Python builtin ... apply of FunctionMeta is currently not supported in Torchscript". The run itself keeps
DeepSpeed's version while it lasts.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch.nn.functional as F

PATCHED = ('linear', 'embedding')


@contextmanager
def restored() -> Iterator[None]:
    """Inside: whatever DeepSpeed sets; on leaving, however it leaves, torch's functions as they were on entry."""
    saved = {name: getattr(F, name) for name in PATCHED}
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)
