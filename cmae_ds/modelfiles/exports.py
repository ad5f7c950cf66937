"""The exports of launch/convert_checkpoint.py: a model file in, another format out, with its model card.

Each export keeps the source's training facts ('run', written at the end of pretraining) so that the card of an
extracted or timm encoder still says what it was trained on and how well it did.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError, ModelConfig, load_config
from .formats import (
    build_timm_vit,
    encoder_state,
    encoder_to_timm,
    extract_encoder,
    load_official_cmae,
    read_file,
)
from .model_card import write_model_card
from .model_file import MODEL_FORMAT, PICKLE_SUFFIXES, SUFFIX, write_model_file
from .safe_load import CheckpointError

TIMM_FORMAT = 'cmae_ds.timm'


def export(action: str, src: str, out: Optional[str], overrides: list, *, trust: bool = False) -> list[str]:
    """Write `out` (and its card) from `src`; the lines to print."""
    obj = read_file(src, 'checkpoint', trust=trust)
    if action == 'to-safetensors':
        out_path = Path(out) if out else Path(src).with_suffix(SUFFIX)
        if out_path.suffix in PICKLE_SUFFIXES:
            raise ConfigError(f'to-safetensors: {out_path} names a pickle format; give a .safetensors name')
        payload, dropped = as_safetensors_payload(obj, src)
        lines = _write(payload, out_path)
        return lines + ([f'left out (not JSON): {", ".join(dropped)}'] if dropped else [])
    if out is None:
        raise ConfigError(f'{action}: give the output file (OUT)')
    cfg = _model_config(obj, overrides)
    run = obj.get('run') if isinstance(obj, dict) else None
    if action == 'official-to-ours':
        # Loading validates every key and shape before anything is written.
        state = load_official_cmae(obj, cfg).state_dict()
        payload = {'format': MODEL_FORMAT, 'state_dict': state, 'model_config': asdict(cfg)}
    elif action == 'extract-encoder':
        payload = extract_encoder(obj, cfg)
    elif action == 'to-timm':
        state = encoder_to_timm(encoder_state(obj))
        build_timm_vit(state, cfg)  # the export must load into timm's VisionTransformer as it is
        payload = {'format': TIMM_FORMAT, 'state_dict': state, 'model_config': asdict(cfg)}
        payload['timm_model'] = timm_model_name(cfg)
        if Path(out).suffix in PICKLE_SUFFIXES:  # the old export: timm's bare state dict
            torch.save(state, out)
            return [f'wrote {out}']
    else:
        raise ConfigError(f'unknown action {action}')
    if run:
        payload['run'] = run
    return _write(payload, Path(out))


def _write(payload: dict, out: Path) -> list[str]:
    out.parent.mkdir(parents=True, exist_ok=True)
    path = write_model_file(payload, out)
    description = {k: v for k, v in payload.items() if k != 'state_dict'}
    card = write_model_card(path, description, payload['state_dict'])
    lines = [f'wrote {path}', f'model card: {card}']
    if payload.get('timm_model'):
        lines.append(
            f"timm: timm.create_model('{payload['timm_model']}', pretrained=True, num_classes=0, "
            f"pretrained_cfg_overlay=dict(file='{path}'))"
        )
    return lines


def _model_config(obj, overrides: list) -> ModelConfig:
    """The model section: from the overrides when given, else as the source file describes it, else the default."""
    if not overrides and isinstance(obj, dict) and isinstance(obj.get('model_config'), dict):
        return ModelConfig(**obj['model_config'])
    return load_config(None, overrides).model


def timm_model_name(cfg: ModelConfig) -> Optional[str]:
    """timm's registered name of this architecture (vit_base_patch16_224, ...), or None when timm has none."""
    import timm

    name = f'{cfg.size}_patch{cfg.patch_size}_{cfg.img_size}'
    return name if timm.is_model(name) else None


def as_safetensors_payload(obj, src) -> tuple[dict, list[str]]:
    """{'state_dict': tensors, **JSON-able description} from a loaded .pt file; the keys left out."""
    if not isinstance(obj, dict):
        raise CheckpointError(f'{src}: holds a {type(obj).__name__}, not a dict of tensors')
    if isinstance(obj.get('state_dict'), dict):
        state, rest = obj['state_dict'], {k: v for k, v in obj.items() if k != 'state_dict'}
    else:  # a bare state dict (our timm export, anyone's weights)
        state, rest = obj, {}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f'{src}: state_dict entries that are not tensors: {", ".join(map(str, bad[:5]))}')
    description, dropped = {}, []
    for key, value in rest.items():
        try:
            json.dumps(value)
            description[key] = value
        except (TypeError, ValueError):
            dropped.append(key)
    if 'format' not in description and any(k.startswith('target_encoder.') for k in state):
        description['format'] = MODEL_FORMAT  # our model.pt, which did not name its format
    return {'state_dict': state, **description}, dropped
