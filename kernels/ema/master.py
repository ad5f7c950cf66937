"""MasterEMA: the momentum update read from DeepSpeed's fp32 master weights, one launch per parameter group.

DeepSpeed's ZeRO-1/2 optimizer (and its BF16_Optimizer, which ZeRO-1 takes with fp32 gradient accumulation) keeps each
parameter group's weights in one flat buffer (`bit16_groups_flat`, `bf16_groups_flat`: the model's parameters are views
of it) and this rank's partition of it in fp32 (`single_partition_of_fp32_groups`, `fp32_groups_flat_partition`), padded
so that every rank's part has the same size (deepspeed/runtime/zero/stage_1_and_2.py, runtime/bf16_optimizer.py). The
target weights are laid out the same way in fp32: each rank updates its part from its fp32 master in one launch, and one
all-gather per group fills in the others' parts. The EMA then averages the weights the optimizer holds, not their bf16
copies.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from .._switch import record
from .._triton import load_fused
from .reference import ema_flat_reference, ema_list_reference

log = logging.getLogger(__name__)


def master_groups(optimizer) -> Optional[list]:
    """[(flat weights buffer, this rank's fp32 master part, its start in the buffer, process group)] of a DeepSpeed
    optimizer whose fp32 master lives on the device beside the flat buffer, else None."""
    names = (
        ('bit16_groups_flat', 'single_partition_of_fp32_groups', 'parallel_partitioned_bit16_groups'),
        ('bf16_groups_flat', 'fp32_groups_flat_partition', 'bf16_partitioned_groups'),
    )
    for flat_name, master_name, parts_name in names:
        flats, masters = getattr(optimizer, flat_name, None), getattr(optimizer, master_name, None)
        if not flats or not masters or getattr(optimizer, 'cpu_offload', False):
            continue
        groups = []
        for i, (flat, master) in enumerate(zip(flats, masters)):
            group = optimizer.real_dp_process_group[i]
            rank = torch.distributed.get_rank(group=group) if torch.distributed.is_initialized() else 0
            part = getattr(optimizer, parts_name)[i][rank]
            if master.device != flat.device or master.numel() * _world(group) != flat.numel():
                return None
            groups.append((flat, master, _offset(part, flat), group))
        return groups
    return None


def _world(group) -> int:
    return torch.distributed.get_world_size(group=group) if torch.distributed.is_initialized() else 1


def _offset(view: torch.Tensor, flat: torch.Tensor) -> Optional[int]:
    """Where `view` starts in `flat` (elements), or None when it is not a view of it."""
    if view.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
        return None
    return (view.data_ptr() - flat.data_ptr()) // view.element_size()


def _place(online: torch.Tensor, groups: list) -> Optional[tuple]:
    """(group, offset) of an online weight that is a view of a group's flat buffer."""
    for g, (flat, *_) in enumerate(groups):
        off = _offset(online, flat)
        if off is not None:
            return g, off
    return None


class MasterEMA:
    """target = m * target + (1 - m) * master, with the fp32 targets re-pointed into flat buffers shaped like
    DeepSpeed's (`groups` from `master_groups`). Targets whose online weights are in no group (frozen ones) take
    a foreach update from the online weights."""

    def __init__(self, targets: Sequence[torch.Tensor], online: Sequence[torch.Tensor], groups: list):
        self.groups = groups
        # the padding between tensors starts as the online weights: the update keeps it next to the master there
        self.flats = [flat.detach().to(torch.float32, copy=True) for flat, *_ in groups]
        self.rest_targets, self.rest_online = [], []
        for t, o in zip(targets, online):
            place = _place(o, groups)
            if place is None:
                self.rest_targets.append(t)
                self.rest_online.append(o)
                continue
            g, off = place
            view = self.flats[g][off : off + t.numel()].view(t.shape)
            view.copy_(t.detach())
            t.data = view  # the Parameter object stays: the target module reads the flat buffer

    @torch.no_grad()
    def update(self, m: float) -> None:
        weight = 1.0 - float(m)
        for flat, (_, master, start, group) in zip(self.flats, self.groups):
            part = flat[start : start + master.numel()]
            fused = load_fused('ema', __package__, part, master)
            if fused is not None:
                record('ema', 'master_triton')
                fused.ema_flat_triton(part, master, weight)
            else:
                record('ema', 'master')
                ema_flat_reference(part, master, weight)
            if _world(group) > 1:
                torch.distributed.all_gather_into_tensor(flat, part, group=group)
        if self.rest_targets:
            ema_list_reference(self.rest_targets, self.rest_online, weight)
