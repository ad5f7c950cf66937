"""Named model sizes (docs/spec.md section 3): the encoder table, and the heads that go with each size."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderSize:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    patch_size: int


# `debug` is small enough to train for a few steps on a CPU in a test.
ENCODER_SIZES: dict[str, EncoderSize] = {
    'debug': EncoderSize(embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0, patch_size=16),
    'vit_small': EncoderSize(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, patch_size=16),
    'vit_base': EncoderSize(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, patch_size=16),
    'vit_large': EncoderSize(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, patch_size=16),
    'vit_huge': EncoderSize(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0, patch_size=14),
    'vit_giant': EncoderSize(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=6144 / 1408, patch_size=14),
}

# docs/spec.md section 4: both decoders, whatever the encoder's MLP ratio (ViT-g's is 4.36).
DECODER_MLP_RATIO = 4.0

OFFICIAL_HEADS = dict(
    decoder_embed_dim=512,
    decoder_depth=8,
    decoder_num_heads=16,
    feature_decoder_depth=2,
    proj_hidden_dim=1536,
    proj_dim=256,
)
# Decoder and projector widths that go with the small debug encoder; every other size uses the official ones.
DEBUG_HEADS = dict(
    decoder_embed_dim=64,
    decoder_depth=1,
    decoder_num_heads=4,
    feature_decoder_depth=1,
    proj_hidden_dim=128,
    proj_dim=32,
)


def size_defaults(size: str, mode: str) -> dict:
    """Every architecture field a ModelConfig leaves at None, for a named size and mode."""
    enc = ENCODER_SIZES[size]
    heads = DEBUG_HEADS if size == 'debug' else OFFICIAL_HEADS
    return {
        'embed_dim': enc.embed_dim,
        'depth': enc.depth,
        'num_heads': enc.num_heads,
        'mlp_ratio': enc.mlp_ratio,
        'patch_size': enc.patch_size,
        **heads,
        'mask_ratio': 0.65 if mode == 'cmae' else 0.75,
    }
