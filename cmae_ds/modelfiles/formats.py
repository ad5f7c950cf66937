"""Model checkpoints: official CMAE conversion, encoder extraction, timm export, strict loading with clear errors.

DeepSpeed training checkpoints (save/resume of a run) live in cmae_ds.engine.checkpoints.store; this module is about
model weights moving between formats.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Optional, Union

from torch import nn

from ..config import ModelConfig
from ..models import CMAE, LinearProbe, ViTClassifier, ViTEncoder, build_encoder, resize_pos_embed
from .model_file import is_safetensors, read_model_file
from .safe_load import CheckpointError, UnsafeCheckpoint, load_checkpoint_file  # noqa: F401 (part of this API)

StateSource = Union[str, Path, dict]
ENCODER_FORMAT = 'cmae_ds.encoder'
_TIMM_HEAD = ('head.', 'fc_norm.')  # a timm ViT classifier's head and pooled norm


# Official (mmselfsup) top-level prefixes -> ours.
_OFFICIAL_PREFIXES = {
    'backbone.': 'encoder.',
    'target_backbone.': 'target_encoder.',
    'pixel_decoder.': 'pixel_decoder.',
    'feature_decoder.': 'feature_decoder.',
    'projector.': 'projector.',
    'target_projector.': 'target_projector.',
    'head.predictor.': 'predictor.',
    'neck.': 'pixel_decoder.',  # the official MAE baseline stores its decoder as its neck
}

# Inside an encoder or decoder: the first matching rule applies.
_OFFICIAL_RULES = [
    (re.compile(r'^patch_embed\.projection\.'), 'patch_embed.proj.'),
    (re.compile(r'^(?:layers|decoder_blocks)\.(\d+)\.ln1\.'), r'blocks.\1.norm1.'),
    (re.compile(r'^(?:layers|decoder_blocks)\.(\d+)\.ln2\.'), r'blocks.\1.norm2.'),
    (re.compile(r'^(?:layers|decoder_blocks)\.(\d+)\.ffn\.layers\.0\.0\.'), r'blocks.\1.mlp.fc1.'),
    (re.compile(r'^(?:layers|decoder_blocks)\.(\d+)\.ffn\.layers\.1\.'), r'blocks.\1.mlp.fc2.'),
    (re.compile(r'^(?:layers|decoder_blocks)\.(\d+)\.attn\.'), r'blocks.\1.attn.'),
    (re.compile(r'^ln1\.'), 'norm.'),
    (re.compile(r'^decoder_pos_embed$'), 'pos_embed'),
    (re.compile(r'^decoder_embed\.'), 'embed.'),
    (re.compile(r'^decoder_pred\.'), 'pred.'),
]


def convert_official_suffix(key: str) -> str:
    """Rename one key inside an official encoder/decoder/projector to ours (unchanged when no rule matches)."""
    for pattern, repl in _OFFICIAL_RULES:
        if pattern.search(key):
            return pattern.sub(repl, key, count=1)
    return key


def convert_official_cmae(state: dict) -> dict:
    """Official pretraining state dict -> our CMAE state dict. Keys with unknown prefixes are kept (and will be
    reported as unexpected by the strict load)."""
    out = {}
    for key, value in state.items():
        for old, new in _OFFICIAL_PREFIXES.items():
            if key.startswith(old):
                key = new + convert_official_suffix(key[len(old) :])
                break
        out[key] = value
    return out


def convert_official_classifier(state: dict) -> dict:
    """Official fine-tuned classifier (backbone.* with fc_norm, head.head.*) -> our ViTClassifier state dict."""
    out = {}
    for key, value in state.items():
        if key.startswith('backbone.fc_norm.'):
            out['fc_norm.' + key[len('backbone.fc_norm.') :]] = value
        elif key.startswith('backbone.'):
            out['encoder.' + convert_official_suffix(key[len('backbone.') :])] = value
        elif key.startswith('head.head.'):
            out['head.' + key[len('head.head.') :]] = value
        else:
            out[key] = value
    return out


def read_file(path: Union[str, Path], what: str = 'checkpoint', *, trust: bool = False):
    """The object in a checkpoint file: a safetensors file as {'state_dict': tensors, **its description} (nothing to
    unpickle), a torch file through cmae_ds.modelfiles.safe_load (`trust`: see there)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{what} {path}: no such file')
    if is_safetensors(path):
        return read_model_file(path)
    return load_checkpoint_file(path, trust=trust)


def read_state(source: StateSource, what: str = 'checkpoint', *, trust: bool = False) -> dict:
    """Load a checkpoint file (or take a dict) and unwrap the usual containers ('state_dict', 'module', 'model')."""
    if isinstance(source, (str, Path)):
        source = read_file(source, what, trust=trust)
    if not isinstance(source, dict):
        raise CheckpointError(f'{what}: expected a dict of tensors, got {type(source).__name__}')
    for container in ('state_dict', 'module', 'model'):
        if isinstance(source.get(container), dict):
            return source[container]
    return source


def _config_text(cfg: ModelConfig) -> str:
    keys = (
        'size',
        'mode',
        'img_size',
        'patch_size',
        'embed_dim',
        'depth',
        'num_heads',
        'decoder_embed_dim',
        'decoder_depth',
        'feature_decoder_depth',
        'proj_hidden_dim',
        'proj_dim',
    )
    return ', '.join(f'{k}={getattr(cfg, k)}' for k in keys)


def load_strict(module: nn.Module, state: dict, *, what: str, cfg: ModelConfig, limit: int = 8) -> None:
    """Load `state` into `module` or raise one CheckpointError listing missing, unexpected and mis-shaped keys."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f'{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}'
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or misshaped:
        lines = [f'{what} does not fit {type(module).__name__}({_config_text(cfg)}):']
        for label, items in (('missing', missing), ('unexpected', unexpected), ('wrong shape', misshaped)):
            if items:
                more = f' ... and {len(items) - limit} more' if len(items) > limit else ''
                lines.append(f'  {len(items)} {label}: {", ".join(items[:limit])}{more}')
        raise CheckpointError('\n'.join(lines))
    module.load_state_dict(state, strict=True)


def load_official_cmae(source: StateSource, config: ModelConfig, *, trust: bool = False) -> CMAE:
    """An official CMAE pretraining checkpoint (bare state dict or under 'state_dict') -> our CMAE, all of it."""
    model = CMAE(config)
    load_strict(
        model,
        convert_official_cmae(read_state(source, 'official CMAE checkpoint', trust=trust)),
        what='official CMAE checkpoint',
        cfg=config,
    )
    return model


def load_official_classifier(
    source: StateSource, config: ModelConfig, num_classes: int, *, trust: bool = False
) -> ViTClassifier:
    """An official fine-tuned classifier -> our ViTClassifier; the position embedding is resized to
    config.img_size when the checkpoint was made at another resolution."""
    state = convert_official_classifier(read_state(source, 'official classifier checkpoint', trust=trust))
    model = ViTClassifier(config, num_classes)
    resize_pos_embed(state, 'encoder.pos_embed', model.encoder.grid)
    load_strict(model, state, what='official classifier checkpoint', cfg=config)
    return model


def encoder_state(source: StateSource, *, trust: bool = False) -> dict:
    """The online encoder's weights, in our names, from any checkpoint we know: ours (CMAE, classifier, extracted
    encoder), an official pretraining checkpoint, an official extracted backbone."""
    if isinstance(source, (str, Path)):
        source = read_file(source, 'pretrained checkpoint', trust=trust)
    if isinstance(source, dict) and source.get('format') == ENCODER_FORMAT:
        return dict(source['state_dict'])
    state = read_state(source, 'pretrained checkpoint')
    if any(k.startswith('encoder.') for k in state):
        return {k[len('encoder.') :]: v for k, v in state.items() if k.startswith('encoder.')}
    if any(k.startswith('backbone.') for k in state):
        return {
            convert_official_suffix(k[len('backbone.') :]): v for k, v in state.items() if k.startswith('backbone.')
        }
    if any(k.startswith('layers.') or k.startswith('blocks.') for k in state):
        # a bare encoder: an official backbone, our timm export, or any timm ViT (its head is not the encoder's)
        return {convert_official_suffix(k): v for k, v in state.items() if not k.startswith(_TIMM_HEAD)}
    raise CheckpointError(f'pretrained checkpoint: no encoder found (first keys: {list(state)[:5]})')


def load_encoder(source: StateSource, config: ModelConfig, *, trust: bool = False) -> ViTEncoder:
    """An encoder with its final norm (as pretrained), from any checkpoint encoder_state understands."""
    encoder = build_encoder(config, final_norm=True)
    state = encoder_state(source, trust=trust)
    resize_pos_embed(state, 'pos_embed', encoder.grid)
    load_strict(encoder, state, what='pretrained encoder', cfg=config)
    return encoder


def classifier_from_pretrained(
    source: StateSource,
    config: ModelConfig,
    num_classes: int,
    *,
    drop_path: float = 0.0,
    img_size: Optional[int] = None,
    trust: bool = False,
) -> ViTClassifier:
    """Start fine-tuning: the pretrained encoder (final norm dropped, position embedding learned from here on and
    resized to the fine-tuning resolution), a fresh fc_norm and head."""
    model = ViTClassifier(config, num_classes, drop_path=drop_path, img_size=img_size)
    state = {k: v for k, v in encoder_state(source, trust=trust).items() if not k.startswith('norm.')}
    resize_pos_embed(state, 'pos_embed', model.encoder.grid)
    load_strict(model.encoder, state, what='pretrained encoder', cfg=config)
    return model


def extract_encoder(source: StateSource, config: Optional[ModelConfig] = None, *, trust: bool = False) -> dict:
    """The role of the official tools/extract_backbone_weights.py: a small file holding only the online encoder."""
    out = {'format': ENCODER_FORMAT, 'state_dict': encoder_state(source, trust=trust)}
    if config is not None:
        out['model_config'] = dataclasses.asdict(config)
    return out


def timm_kwargs(
    config: ModelConfig, *, num_classes: int = 0, global_pool: str = 'token', img_size: Optional[int] = None
) -> dict:
    """Arguments of timm.models.vision_transformer.VisionTransformer that reproduce our encoder/classifier."""
    from functools import partial

    return dict(
        img_size=img_size or config.img_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=True,
        num_classes=num_classes,
        global_pool=global_pool,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )


def encoder_to_timm(encoder_sd: dict) -> dict:
    """Our encoder names are timm's (see cmae_ds.models.vit); the export is a copy with plain tensors."""
    return {k: v.detach().clone() for k, v in encoder_sd.items()}


def build_timm_vit(encoder_sd: dict, config: ModelConfig):
    """timm VisionTransformer (global_pool='token', final norm) loaded with our encoder's weights."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**timm_kwargs(config))
    load_strict(model, encoder_to_timm(encoder_sd), what='encoder exported to timm', cfg=config)
    return model


def probe_from_pretrained(
    source, cfg: ModelConfig, num_classes: int, *, pool: str = 'cls', img_size: int | None = None, trust: bool = False
) -> LinearProbe:
    """A LinearProbe over the pretrained encoder (with its final norm) of any checkpoint that
    encoder_state reads; the position embedding is resized when img_size differs."""
    encoder = build_encoder(cfg, final_norm=True, img_size=img_size)
    state = encoder_state(source, trust=trust)
    resize_pos_embed(state, 'pos_embed', encoder.grid)
    load_strict(encoder, state, what='pretrained encoder', cfg=cfg)
    return LinearProbe(encoder, cfg.embed_dim, num_classes, pool)
