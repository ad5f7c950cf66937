"""Plain PyTorch models: no DeepSpeed, no process-group setup, no data code."""

from .classifier import ViTClassifier
from .cmae import CMAE, TargetBranch
from .masking import block_mask, patch_mask, patchify, unpatchify, visible_ids
from .probe import LinearProbe, build_probe
from .vit import ViTEncoder, build_encoder, interpolate_pos_embed, resize_pos_embed, sincos_pos_embed_2d

__all__ = [
    'CMAE',
    'TargetBranch',
    'ViTClassifier',
    'ViTEncoder',
    'LinearProbe',
    'block_mask',
    'build_encoder',
    'build_probe',
    'patch_mask',
    'patchify',
    'unpatchify',
    'visible_ids',
    'interpolate_pos_embed',
    'resize_pos_embed',
    'sincos_pos_embed_2d',
]
