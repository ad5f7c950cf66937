"""Top-1 / top-5 evaluation on one or many ranks, and the classifier files that fine-tuning and probing write.

With several ranks the evaluation loader pads the last batch DistributedSampler-style; padded samples carry
`valid=False` and are not counted, so every image of the validation set counts exactly once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointError, load_official_classifier, load_strict, read_state
from ..config import ConfigError, ModelConfig
from ..models import ViTClassifier, interpolate_pos_embed
from ..safe_load import load_checkpoint_file
from .output_dir import write_atomically

CLASSIFIER_FORMAT = 'cmae_ds.classifier'
BEST, LAST = 'model_best.pt', 'model_last.pt'


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
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[dict], device: torch.device, *,
             keep_predictions: bool = False) -> EvalResult:
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
        totals += torch.stack([(hit[:, 0] & valid).sum(), (hit.any(1) & valid).sum(),
                               (loss * valid).sum(), valid.sum()]).double()
        if keep_predictions:
            kept.extend(zip(batch['index'][valid.cpu()].tolist(), top[valid, 0].cpu().tolist(),
                            label[valid].cpu().tolist()))
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
        raise ConfigError(f'{where}: {len(bad)} of {len(samples)} images have a label outside [0, {num_classes}), '
                          f'e.g. {path} with label {label}{hint}; check num_classes and the data source')


def save_classifier_file(path: Path, state_dict: dict, *, kind: str, model_cfg: ModelConfig, num_classes: int,
                         img_size: int, extra: Optional[dict] = None) -> Path:
    """A self-describing model file (format 'cmae_ds.classifier'): everything evaluate needs, no DeepSpeed."""
    payload = {'format': CLASSIFIER_FORMAT, 'kind': kind, 'state_dict': state_dict,
               'model_config': dataclasses.asdict(model_cfg), 'num_classes': num_classes, 'img_size': img_size,
               **(extra or {})}
    return write_atomically(path, lambda tmp: torch.save(payload, tmp), 'model file')


@dataclass
class LoadedClassifier:
    model: nn.Module
    img_size: int
    num_classes: int
    description: str


def resolve_checkpoint(source: Union[str, Path]) -> Path:
    """A fine-tuning run folder means its best model file (or its last when there was no evaluation yet)."""
    path = Path(source)
    if path.is_dir():
        for name in (BEST, LAST):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f'{path}: a folder without {BEST} or {LAST}; pass a fine-tuning run folder or a file')
    if not path.is_file():
        raise CheckpointError(f'checkpoint {path}: no such file')
    return path


def load_classifier(source: Union[str, Path], model_cfg: Optional[ModelConfig] = None,
                    num_classes: Optional[int] = None) -> LoadedClassifier:
    """Ours (a fine-tuning or probing run folder or its model file; a bare ViTClassifier state dict) or an official
    fine-tuned classifier .pth. The last two do not describe their model: model_cfg gives the architecture and the
    evaluation resolution (model_cfg.img_size; the position embedding is resized to it); the head's size is read
    from the file and checked against num_classes when given."""
    path = resolve_checkpoint(source)
    try:
        obj = load_checkpoint_file(path)
    except Exception as e:  # pickle, zip and torch errors all mean "not a readable checkpoint"
        raise CheckpointError(f'checkpoint {path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})')
    if isinstance(obj, dict) and obj.get('format') == CLASSIFIER_FORMAT:
        return _load_ours(obj, path)
    state = read_state(obj, f'checkpoint {path}')
    head = 'head.head.weight' if 'head.head.weight' in state else 'head.weight'
    if head not in state or not any(k.startswith(('backbone.', 'encoder.')) for k in state):
        raise CheckpointError(f'checkpoint {path} is not a fine-tuned classifier (no classification head; first keys '
                              f'{list(state)[:4]}); fine-tune it first with launch/finetune.py')
    if model_cfg is None:
        raise ConfigError(f'checkpoint {path} does not describe its model: give the model section (--config or '
                          'model.* overrides)')
    classes = int(state[head].shape[0])
    if num_classes is not None and num_classes != classes:
        raise ConfigError(f'num_classes {num_classes}, but checkpoint {path} has a {classes}-way head')
    if head == 'head.head.weight':
        return LoadedClassifier(load_official_classifier(state, model_cfg, classes), model_cfg.img_size, classes,
                                f'official classifier {path}')
    model = ViTClassifier(model_cfg, classes)
    state = dict(state)
    pos = state.get('encoder.pos_embed')
    if pos is not None and pos.shape[1] != model.encoder.grid ** 2 + 1:
        state['encoder.pos_embed'] = interpolate_pos_embed(pos, model.encoder.grid)
    load_strict(model, state, what=f'classifier checkpoint {path}', cfg=model_cfg)
    return LoadedClassifier(model, model_cfg.img_size, classes, f'classifier state dict {path}')


def _load_ours(obj: dict, path: Path) -> LoadedClassifier:
    cfg = ModelConfig(**obj['model_config'])
    num_classes, img_size, kind = int(obj['num_classes']), int(obj['img_size']), obj.get('kind', 'finetune')
    if kind == 'linprobe':
        from .linprobe import build_probe
        model = build_probe(cfg, num_classes, pool=obj.get('pool', 'cls'), img_size=img_size)
    else:
        model = ViTClassifier(cfg, num_classes, img_size=img_size)
    load_strict(model, obj['state_dict'], what=f'{kind} model file {path}', cfg=cfg)
    epoch = obj.get('epoch')
    return LoadedClassifier(model, img_size, num_classes,
                            f'{kind} {path}' + (f' (epoch {epoch})' if epoch is not None else ''))
