"""Top-1 / top-5 evaluation on one or many ranks (the classifier files it reads: cmae_ds.modelfiles.classifier).

With several ranks the evaluation loader pads the last batch DistributedSampler-style; padded samples carry
`valid=False` and are not counted, so every image of the validation set counts exactly once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from ..config import ConfigError


@dataclass
class EvalResult:
    top1: float
    """Percent of images whose highest logit is the label."""
    top5: float
    """Percent with the label among the min(5, num_classes) highest logits."""
    loss: float
    """Mean cross entropy (no smoothing)."""
    images: int
    """Images counted over all ranks (padding excluded)."""
    predictions: Optional[list] = None
    """With keep_predictions: [(dataset index, predicted class, label)] over all ranks, sorted by index."""

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@torch.no_grad()
def evaluate(
    forward: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[dict],
    device: torch.device,
    *,
    keep_predictions: bool = False,
) -> EvalResult:
    """Run `forward` (img (N, 3, S, S) on `device` -> logits (N, C)) over this rank's batches ({'img', 'label',
    optional 'valid', 'index'}) and sum over ranks. Collective when torch.distributed is initialized; the counts
    stay on the device until the end (no per-batch host sync)."""
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss sum, images
    kept = []
    for batch in batches:
        img, label = batch['img'].to(device, non_blocking=True), batch['label'].to(device, non_blocking=True)
        valid = batch.get('valid', torch.ones_like(label, dtype=torch.bool)).to(device)
        logits = forward(img).float()  # (N, C)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (N, k)
        hit = top.eq(label[:, None])
        loss = F.cross_entropy(logits, label, reduction='none')
        totals += torch.stack(
            [(hit[:, 0] & valid).sum(), (hit.any(1) & valid).sum(), (loss * valid).sum(), valid.sum()]
        ).double()
        if keep_predictions:
            kept.extend(
                zip(batch['index'][valid.cpu()].tolist(), top[valid, 0].cpu().tolist(), label[valid].cpu().tolist())
            )
    _all_reduce(totals)
    c1, c5, loss_sum, n = totals.tolist()
    n_safe = max(n, 1.0)
    preds = _gather_predictions(kept) if keep_predictions else None
    return EvalResult(100.0 * c1 / n_safe, 100.0 * c5 / n_safe, loss_sum / n_safe, int(n), preds)


def _all_reduce(t: torch.Tensor) -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)


def _gather_predictions(kept: list) -> list:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, kept)
        kept = [p for part in parts for p in part]
    return sorted(kept)


def check_labels(samples: list, num_classes: int, where: str) -> None:
    """Every sample needs a label in [0, num_classes); the message names the data section and the first offender."""
    bad = [(path, label) for path, label in samples if not 0 <= label < num_classes]
    if bad:
        path, label = bad[0]
        hint = ' (this source has no labels)' if label < 0 else ''
        raise ConfigError(
            f'{where}: {len(bad)} of {len(samples)} images have a label outside [0, {num_classes}), '
            f'e.g. {path} with label {label}{hint}; check num_classes and the data source'
        )
