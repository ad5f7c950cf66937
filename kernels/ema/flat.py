"""FlatEMA: the target and online tensors laid out once in two flat buffers, updated in one launch."""

import logging
from typing import List, Optional, Sequence

import torch

from .._switch import record
from .._triton import load_fused
from .reference import ema_flat_reference, ema_list_reference

log = logging.getLogger(__name__)
_ALIGN = 16  # elements: every tensor starts 64-byte aligned in the fp32 buffer, so per-tensor kernels stay vectorized


def _layout(shapes) -> (List[int], int):
    offsets, total = [], 0
    for shape in shapes:
        offsets.append(total)
        numel = torch.Size(shape).numel()
        total += (numel + _ALIGN - 1) // _ALIGN * _ALIGN
    return offsets, total


def _single_dtype(tensors, what: str) -> torch.dtype:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f'FlatEMA needs one dtype across the {what} tensors, got {sorted(map(str, dtypes))}')
    return dtypes.pop()


class FlatEMA:
    """EMA of `online_tensors` into `target_tensors`: target = m * target + (1 - m) * online.

    At construction the target values are copied into one fp32 flat buffer (`target_flat`, (T,)) and, when
    `repoint_online`, the online values into one flat buffer of their dtype (`online_flat`). Each tensor's `.data`
    is then re-pointed at its view of the buffer, so model code keeps using the same Parameter objects (and any
    optimizer built on them keeps working), while `update` touches every tensor in one launch.

    Targets that are not fp32 (a module cast to bf16 by DeepSpeed) become views of a low-precision `shadow_flat`;
    the fp32 values live only in `target_flat` and the kernel writes both, so the EMA never loses the small steps
    bf16 cannot represent. Save `fp32_targets()` in checkpoints, not the model's bf16 copies.

    Fallback: when the online tensors cannot be re-pointed (`repoint_online=False`, mixed dtypes or devices, views
    into another owner's flat buffer such as DeepSpeed ZeRO-1/2's, or something re-pointed them after
    construction, e.g. a DeepSpeed engine built later flattening its parameters), `update` takes the
    online list each call and runs `torch._foreach_lerp_` on fp32 casts of it: correct, but several launches and
    a cast copy of bf16 weights. Pass `online=` to `update` to give the values explicitly (e.g. ZeRO-3 shards of
    the same shapes as the targets this FlatEMA was built on).
    """

    def __init__(
        self,
        target_tensors: Sequence[torch.Tensor],
        online_tensors: Sequence[torch.Tensor],
        repoint_online: bool = True,
    ):
        self._targets = list(target_tensors)
        self._online = list(online_tensors)
        if len(self._targets) != len(self._online):
            raise ValueError(f'{len(self._targets)} target tensors but {len(self._online)} online tensors')
        for i, (t, o) in enumerate(zip(self._targets, self._online)):
            if t.shape != o.shape:
                raise ValueError(f'tensor {i}: target shape {tuple(t.shape)} != online shape {tuple(o.shape)}')
        self._offsets, total = _layout([t.shape for t in self._targets])
        device = self._targets[0].device
        target_dtype = _single_dtype(self._targets, 'target')
        self.target_flat = torch.zeros(total, device=device, dtype=torch.float32)
        self.shadow_flat = (
            None if target_dtype == torch.float32 else torch.zeros(total, device=device, dtype=target_dtype)
        )
        self._fp32_views = self._views(self.target_flat)
        torch._foreach_copy_(self._fp32_views, [t.detach() for t in self._targets])
        if self.shadow_flat is not None:
            self.shadow_flat.copy_(self.target_flat)
        self._target_ptrs = self._repoint(
            self._targets, self.shadow_flat if self.shadow_flat is not None else self.target_flat
        )
        self.online_flat = None
        self._online_ptrs = None
        if repoint_online and self._can_flatten_online(device):
            self.online_flat = torch.zeros(total, device=device, dtype=self._online[0].dtype)
            torch._foreach_copy_(self._views(self.online_flat), [o.detach() for o in self._online])
            self._online_ptrs = self._repoint(self._online, self.online_flat)
        self._warned = False

    def _views(self, flat: torch.Tensor) -> List[torch.Tensor]:
        return [flat[off : off + t.numel()].view(t.shape) for off, t in zip(self._offsets, self._targets)]

    def _repoint(self, tensors, flat) -> List[int]:
        # Setting .data keeps the Parameter objects (and their hooks, names, optimizer entries) alive.
        for t, view in zip(tensors, self._views(flat)):
            t.data = view
        return [t.data_ptr() for t in tensors]

    def _can_flatten_online(self, device) -> bool:
        same = len({o.dtype for o in self._online}) == 1 and all(o.device == device for o in self._online)
        if not same:
            log.warning('FlatEMA: online tensors have mixed dtypes or devices; using the per-tensor fallback')
            return False
        # A tensor that is a view into a bigger storage belongs to someone's flat buffer (DeepSpeed ZeRO-1/2 keep
        # the bf16 weights as views of theirs and write the stepped weights there): re-pointing it would leave
        # the module reading stale weights, so such online tensors stay where they are.
        owned = [o for o in self._online if o.untyped_storage().nbytes() != o.numel() * o.element_size()]
        if owned:
            log.info('FlatEMA: %d online tensors are views of another flat buffer; per-tensor fallback', len(owned))
            return False
        return self._online[0].is_floating_point()

    @staticmethod
    def _still_aliased(tensors, ptrs) -> bool:
        return [t.data_ptr() for t in tensors] == ptrs

    @property
    def flat(self) -> bool:
        """True when `update()` will take the one-launch path."""
        return self.online_flat is not None and self._still_aliased(self._online, self._online_ptrs)

    def fp32_targets(self) -> List[torch.Tensor]:
        """fp32 views of the target values (what to checkpoint), in the order of `target_tensors`."""
        return list(self._fp32_views)

    def load_fp32_targets(self, values: Sequence[torch.Tensor]) -> None:
        """Restore the fp32 target values (e.g. from a checkpoint) and refresh the low-precision copy."""
        torch._foreach_copy_(self._fp32_views, list(values))
        if self.shadow_flat is not None:
            self.shadow_flat.copy_(self.target_flat)

    @torch.no_grad()
    def update(self, m: float, online: Optional[Sequence[torch.Tensor]] = None) -> None:
        """target = m * target + (1 - m) * online. `m` is a Python float (a tensor would force a host sync)."""
        if not self._still_aliased(self._targets, self._target_ptrs):
            raise RuntimeError(
                'FlatEMA: the target tensors were re-pointed or moved (e.g. .to()/.half() on the '
                'module) after construction; build the FlatEMA again after moving the module'
            )
        weight = 1.0 - float(m)
        if online is None and self.flat:
            self._update_flat(weight)
            return
        if online is None and not self._warned:
            log.warning('FlatEMA: online tensors are not views of the flat buffer; per-tensor fallback')
            self._warned = True
        record('ema', 'foreach_fallback')
        ema_list_reference(self._fp32_views, self._online if online is None else list(online), weight)
        if self.shadow_flat is not None:
            self.shadow_flat.copy_(self.target_flat)

    def _update_flat(self, weight: float) -> None:
        fused = load_fused('ema', __package__, self.target_flat, self.online_flat)
        if fused is not None:
            record('ema', 'triton')
            fused.ema_flat_triton(self.target_flat, self.online_flat, weight, self.shadow_flat)
        else:
            record('ema', 'reference')
            ema_flat_reference(self.target_flat, self.online_flat, weight, self.shadow_flat)
