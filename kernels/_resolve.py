"""`resolve(device, head_dims)`: every per-call choice of the kernels made now, before `torch.compile` traces a model.

Each op keeps its choice per device type (and dtype, for attention) in a table that `configure` empties; a choice
made while dynamo traces would import modules and log, which breaks the graph.
"""

import importlib

import torch

from ._triton import load_fused, pin_reference
from .attention import resolve_attention

_FUSED_OPS = {'recon_loss': '.recon_loss', 'visible_embed': '.visible_embed', 'ema': '.ema'}


def resolve(device, head_dims=(64,), reference=()) -> None:
    """Fill the tables for tensors on `device` (attention for each of `head_dims`). Ops named in `reference` take
    their PyTorch reference on `device` until the next `configure`: a whole-model compile traces them, and dynamo
    cannot trace the Triton interpreter (inductor fuses the reference itself)."""
    device = torch.device(device)
    resolve_attention(device, tuple(head_dims))
    probe = torch.empty(0, device=device)
    for op, sub in _FUSED_OPS.items():
        if op in reference:
            pin_reference(op, device)
        else:
            load_fused(op, importlib.import_module(sub, __package__).__name__, probe)
