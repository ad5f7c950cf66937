"""Zero3MasterEMA: the momentum update read from ZeRO-3's fp32 master partitions.

ZeRO-3 keeps no full weights anywhere: each rank holds, per sub-group, one flat buffer of its partitions of the
sub-group's parameters in the training dtype (`fp16_partitioned_groups_flat`; each parameter's `ds_tensor` is a
view of it) and the same layout in fp32 (`fp32_partitioned_groups_flat`, the master). A parameter of n elements is
split into world parts of `partition_numel()` elements, rank r holding elements [r * pn, (r + 1) * pn) of it
flattened, the last rank's part padded (deepspeed/runtime/zero/partition_parameters.py, `_partition_param`;
runtime/zero/stage3.py, `_create_fp32_partitions`).

The target stays whole (the target branch runs on every rank and DeepSpeed does not see it). Per sub-group and
step: this rank's slices of the targets are copied into a buffer laid out like its master, moved towards the master
in one launch, all-gathered, and copied back into the targets. Gathering the bf16 weights instead (what
GatheredParameters gives) averaged their rounded copies into the target, as ZeRO-1/2 did before kernels/ema/
master.py.

The targets are the state: whatever loads them in place (a resume, a rollback) is what the next update starts
from. Online weights that are in no optimizer group (frozen ones) are gathered and averaged as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .._switch import record
from .._triton import load_fused
from .master import _offset, _world
from .reference import ema_flat_reference, ema_list_reference


@dataclass
class _Group:
    master: torch.Tensor  # this rank's fp32 partitions, flat
    group: object  # the process group the sub-group is partitioned over
    rank: int
    part: torch.Tensor  # the targets' slices, laid out like `master`
    gathered: torch.Tensor  # every rank's `part`, (world * part.numel(),)
    slots: list  # (target, offset in `part`, partition numel)


def zero3_groups(optimizer) -> Optional[list]:
    """[(params, bf16 flat partition, fp32 master partition, process group)] per sub-group of a ZeRO-3 optimizer whose
    partitions and master are on one device, else None (ZeRO-1/2, offload, NVMe)."""
    flats = getattr(optimizer, 'fp16_partitioned_groups_flat', None)
    masters = getattr(optimizer, 'fp32_partitioned_groups_flat', None)
    if not flats or not masters or getattr(optimizer, 'offload_optimizer', False):
        return None
    if getattr(optimizer, 'offload_param', False):
        return None
    out = []
    for i, (flat, master) in enumerate(zip(flats, masters)):
        if flat is None or master.device != flat.device or master.numel() != flat.numel():
            return None
        out.append((optimizer.fp16_groups[i], flat, master, optimizer.sub_group_process_groups[i]))
    return out


class Zero3MasterEMA:
    """target = m * target + (1 - m) * master, for targets whose online weights ZeRO-3 partitions (`groups` from
    `zero3_groups`)."""

    def __init__(self, targets: Sequence[torch.Tensor], online: Sequence[torch.Tensor], groups: list):
        target_of = {id(o): t for t, o in zip(targets, online)}
        self.groups: list[_Group] = []
        for params, flat, master, group in groups:
            slots = []
            for p in params:
                t = target_of.pop(id(p), None)
                off = _offset(p.ds_tensor, flat)
                if t is None:
                    continue  # an online weight with no target (the decoder's)
                if off is None or t.numel() != p.ds_numel or t.dtype != torch.float32:
                    raise ValueError(f'ZeRO-3 EMA: target {tuple(t.shape)} does not match its partitioned weight')
                slots.append((t, off, p.partition_numel()))
            rank = torch.distributed.get_rank(group=group) if torch.distributed.is_initialized() else 0
            part = torch.zeros_like(master, dtype=torch.float32)
            gathered = part.new_empty(part.numel() * _world(group))
            self.groups.append(_Group(master, group, rank, part, gathered, slots))
        rest = [(t, o) for t, o in zip(targets, online) if id(o) in target_of]
        self.rest_targets = [t for t, _ in rest]
        self.rest_online = [o for _, o in rest]

    @torch.no_grad()
    def update(self, m: float) -> None:
        weight = 1.0 - float(m)
        for g in self.groups:
            self._take_slices(g)
            fused = load_fused('ema', __package__, g.part, g.master)
            if fused is not None:
                record('ema', 'master_triton')
                fused.ema_flat_triton(g.part, g.master, weight)
            else:
                record('ema', 'master')
                ema_flat_reference(g.part, g.master, weight)
            self._spread(g)
        if self.rest_targets:
            self._update_rest(weight)

    @staticmethod
    def _take_slices(g: _Group) -> None:
        dst, src = [], []
        for t, off, pn in g.slots:
            mine = t.view(-1)[g.rank * pn : (g.rank + 1) * pn]  # shorter (or empty) on the padded last rank
            dst.append(g.part[off : off + mine.numel()])
            src.append(mine)
        torch._foreach_copy_(dst, src)

    @staticmethod
    def _spread(g: _Group) -> None:
        """Every rank's slices back into the whole targets: whole rows, then the last rank's unpadded rest."""
        world = _world(g.group)
        if world > 1:
            torch.distributed.all_gather_into_tensor(g.gathered, g.part, group=g.group)
        else:
            g.gathered.copy_(g.part)
        rows = g.gathered.view(world, -1)
        dst, src = [], []
        for t, off, pn in g.slots:
            flat, full = t.view(-1), t.numel() // pn
            dst.append(flat[: full * pn].view(full, pn))
            src.append(rows[:full, off : off + pn])
            if full * pn < t.numel():
                dst.append(flat[full * pn :])
                src.append(rows[full, off : off + t.numel() - full * pn])
        torch._foreach_copy_(dst, src)

    def _update_rest(self, weight: float) -> None:
        import deepspeed

        with deepspeed.zero.GatheredParameters(self.rest_online, modifier_rank=None):
            ema_list_reference(self.rest_targets, self.rest_online, weight)
