"""The self-describing classifier files that fine-tuning and linear probing write (`model_best.safetensors`,
`model_last.safetensors`: format 'cmae_ds.classifier', fp32 weights plus the model config, classes and resolution)
and that evaluation reads, together with their older .pt form, official fine-tuned checkpoints and bare classifier
state dicts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from torch import nn

from ..config import ConfigError, ModelConfig
from ..models import ViTClassifier, resize_pos_embed
from .formats import CheckpointError, load_official_classifier, load_strict, read_file, read_state
from .model_card import write_model_card
from .model_file import SUFFIX, write_model_file

CLASSIFIER_FORMAT = 'cmae_ds.classifier'
BEST, LAST = 'model_best' + SUFFIX, 'model_last' + SUFFIX
OLD_BEST, OLD_LAST = 'model_best.pt', 'model_last.pt'  # runs from before safetensors


def save_classifier_file(
    path: Path,
    state_dict: dict,
    *,
    kind: str,
    model_cfg: ModelConfig,
    num_classes: int,
    img_size: int,
    extra: Optional[dict] = None,
    card: bool = False,
) -> Path:
    """A self-describing model file (format 'cmae_ds.classifier'): everything evaluate needs, no DeepSpeed.
    Safetensors, or the pickled form when `path` ends .pt. `card`: this file becomes the subject of the run folder's
    model card (README.md)."""
    payload = {
        'format': CLASSIFIER_FORMAT,
        'kind': kind,
        'state_dict': state_dict,
        'model_config': dataclasses.asdict(model_cfg),
        'num_classes': num_classes,
        'img_size': img_size,
        **(extra or {}),
    }
    path = write_model_file(payload, path)
    if card:
        write_model_card(path, {k: v for k, v in payload.items() if k != 'state_dict'}, state_dict, run_card=True)
    return path


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
        for name in (BEST, OLD_BEST, LAST, OLD_LAST):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f'{path}: a folder without {BEST} or {LAST}; pass a fine-tuning run folder or a file')
    if not path.is_file():
        raise CheckpointError(f'checkpoint {path}: no such file')
    return path


def load_classifier(
    source: Union[str, Path],
    model_cfg: Optional[ModelConfig] = None,
    num_classes: Optional[int] = None,
    *,
    trust: bool = False,
) -> LoadedClassifier:
    """Ours (a fine-tuning or probing run folder or its model file; a bare ViTClassifier state dict) or an official
    fine-tuned classifier .pth. The last two do not describe their model: model_cfg gives the architecture and the
    evaluation resolution (model_cfg.img_size; the position embedding is resized to it); the head's size is read
    from the file and checked against num_classes when given. `trust`: see cmae_ds.modelfiles.safe_load."""
    path = resolve_checkpoint(source)
    obj = read_file(path, trust=trust)
    if isinstance(obj, dict) and obj.get('format') == CLASSIFIER_FORMAT:
        return _load_ours(obj, path)
    state = read_state(obj, f'checkpoint {path}')
    head = 'head.head.weight' if 'head.head.weight' in state else 'head.weight'
    if head not in state or not any(k.startswith(('backbone.', 'encoder.')) for k in state):
        raise CheckpointError(
            f'checkpoint {path} is not a fine-tuned classifier (no classification head; first keys '
            f'{list(state)[:4]}); fine-tune it first with launch/finetune.py'
        )
    if model_cfg is None:
        raise ConfigError(
            f'checkpoint {path} does not describe its model: give the model section (--config or model.* overrides)'
        )
    classes = int(state[head].shape[0])
    if num_classes is not None and num_classes != classes:
        raise ConfigError(f'num_classes {num_classes}, but checkpoint {path} has a {classes}-way head')
    if head == 'head.head.weight':
        return LoadedClassifier(
            load_official_classifier(state, model_cfg, classes),
            model_cfg.img_size,
            classes,
            f'official classifier {path}',
        )
    model = ViTClassifier(model_cfg, classes)
    state = dict(state)
    resize_pos_embed(state, 'encoder.pos_embed', model.encoder.grid)
    load_strict(model, state, what=f'classifier checkpoint {path}', cfg=model_cfg)
    return LoadedClassifier(model, model_cfg.img_size, classes, f'classifier state dict {path}')


def _load_ours(obj: dict, path: Path) -> LoadedClassifier:
    cfg = ModelConfig(**obj['model_config'])
    num_classes, img_size, kind = int(obj['num_classes']), int(obj['img_size']), obj.get('kind', 'finetune')
    if kind == 'linprobe':
        from ..models import build_probe

        model = build_probe(cfg, num_classes, pool=obj.get('pool', 'cls'), img_size=img_size)
    else:
        model = ViTClassifier(cfg, num_classes, img_size=img_size)
    load_strict(model, obj['state_dict'], what=f'{kind} model file {path}', cfg=cfg)
    epoch = obj.get('epoch')
    return LoadedClassifier(
        model, img_size, num_classes, f'{kind} {path}' + (f' (epoch {epoch})' if epoch is not None else '')
    )
