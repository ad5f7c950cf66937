"""Analytic FLOP model of one CMAE/MAE pretraining step, per image, for throughput and MFU.

Only matrix products are counted, each as 2*m*n*k (a multiply and an add): linear layers, the patch-embedding
convolution (a matmul over p*p*C inputs per patch) and attention's two products QK^T and AV. LayerNorm, GELU,
softmax, the losses and the optimizer are left out: they are a few percent at most and are memory-bound anyway,
and leaving them out is the usual convention for MFU (PaLM appendix B, Megatron).

Training cost per component (docs/spec.md sections 3-6):
- trained parts (online encoder blocks, both decoders, projector and predictor): forward + backward = 3x forward,
  since the backward computes a gradient for the input and one for the weight, each as costly as the forward;
- patch embedding: 2x forward, as its input is the image, which needs no gradient;
- target encoder and target projector: 1x forward, no gradient (they follow by EMA).
The contrastive logits (N x global_batch x proj_dim) are not counted: 2 * global_batch * proj_dim per image is
~2 MFLOP at a global batch of 4096, 0.002% of a ViT-B step, and depends on the world size.
"""

from __future__ import annotations

from typing import Optional

from ..config import DECODER_MLP_RATIO

TRAIN_MULT = 3.0  # forward + input grad + weight grad
PATCH_EMBED_MULT = 2.0  # forward + weight grad (the image needs no grad)
NO_GRAD_MULT = 1.0  # forward only


def linear_flops(tokens: int, d_in: int, d_out: int) -> float:
    """A Linear applied to `tokens` rows: (tokens, d_in) @ (d_in, d_out)."""
    return 2.0 * tokens * d_in * d_out


def block_flops(tokens: int, dim: int, mlp_hidden: int) -> float:
    """One pre-norm transformer block over `tokens` tokens of width `dim`.

    qkv (dim -> 3 dim), QK^T and AV (each tokens x tokens x dim summed over heads), proj (dim -> dim) and the
    MLP (dim -> mlp_hidden -> dim). With mlp_hidden = 4 dim this is 24 n d^2 + 4 n^2 d.
    """
    qkv = linear_flops(tokens, dim, 3 * dim)
    attn = 2 * (2.0 * tokens * tokens * dim)
    proj = linear_flops(tokens, dim, dim)
    mlp = linear_flops(tokens, dim, mlp_hidden) + linear_flops(tokens, mlp_hidden, dim)
    return qkv + attn + proj + mlp


def _encoder_flops(cfg, tokens: int) -> float:
    return cfg.depth * block_flops(tokens, cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio))


def _decoder_flops(cfg, depth: int, out_dim: int) -> float:
    """MAE-style decoder: embed the visible tokens (+cls), blocks and prediction over all L+1 tokens."""
    visible, full = cfg.num_visible + 1, cfg.num_patches + 1
    dec = cfg.decoder_embed_dim
    return (
        linear_flops(visible, cfg.embed_dim, dec)
        + depth * block_flops(full, dec, int(dec * DECODER_MLP_RATIO))
        + linear_flops(full, dec, out_dim)
    )


def _mlp_head_flops(d_in: int, hidden: int, d_out: int) -> float:
    """Projector / predictor on one pooled vector per image: Linear -> BN -> ReLU -> Linear."""
    return linear_flops(1, d_in, hidden) + linear_flops(1, hidden, d_out)


def forward_flops_per_image(cfg) -> dict[str, float]:
    """Forward FLOPs per image by component, for a `cmae_ds.config.ModelConfig` (or anything with its fields).

    The patch embedding runs over all L patches (embed, then drop the hidden ones, as MAE does); the online encoder
    over the visible patches + cls; the decoders' blocks over L + 1 tokens; the target encoder over L + 1.
    """
    patch_dim = cfg.patch_size**2 * cfg.in_chans
    patch_embed = linear_flops(cfg.num_patches, patch_dim, cfg.embed_dim)
    out = {
        'patch_embed': patch_embed,
        'online_encoder': _encoder_flops(cfg, cfg.num_visible + 1),
        'pixel_decoder': _decoder_flops(cfg, cfg.decoder_depth, patch_dim),
    }
    if cfg.mode == 'cmae':
        out['feature_decoder'] = _decoder_flops(cfg, cfg.feature_decoder_depth, cfg.embed_dim)
        out['projector_predictor'] = _mlp_head_flops(
            cfg.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim
        ) + _mlp_head_flops(cfg.proj_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        out['target_patch_embed'] = patch_embed
        out['target_encoder'] = _encoder_flops(cfg, cfg.num_patches + 1)
        out['target_projector'] = _mlp_head_flops(cfg.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim)
    return out


# How many forwards each component's training step costs (see the module docstring).
_MULTIPLIER = {
    'patch_embed': PATCH_EMBED_MULT,
    'online_encoder': TRAIN_MULT,
    'pixel_decoder': TRAIN_MULT,
    'feature_decoder': TRAIN_MULT,
    'projector_predictor': TRAIN_MULT,
    'target_patch_embed': NO_GRAD_MULT,
    'target_encoder': NO_GRAD_MULT,
    'target_projector': NO_GRAD_MULT,
}


def flops_per_image(cfg) -> dict[str, float]:
    """Training FLOPs per image per step by component, plus 'total'.

    CMAE ViT-B/16 at 224 with block mask 0.65 (68 visible patches): ~112.1e9; MAE ViT-B/16 (49 visible): ~58.5e9.
    Activation checkpointing is not counted (it recomputes forwards: the work done, not the useful work, grows).
    """
    fwd = forward_flops_per_image(cfg)
    out = {name: _MULTIPLIER[name] * value for name, value in fwd.items()}
    out['total'] = sum(out.values())
    return out


# Dense (no structured sparsity) bf16/fp16 tensor-core peaks, TFLOP/s, from the vendors' datasheets.
# Matched as case-insensitive substrings of torch.cuda.get_device_name(), longest key first, so that
# 'H100 PCIe' wins over 'H100', 'GH200' over 'H200', 'A100' over 'A10' and 'L40S' over 'L40' over 'L4'.
PEAK_TFLOPS: dict[str, float] = {
    'H100': 989.0,  # SXM ('NVIDIA H100 80GB HBM3')
    'H100 PCIe': 756.0,
    'H100 NVL': 835.0,
    'H200': 989.0,
    'GH200': 989.0,
    'B200': 2250.0,
    'A100': 312.0,
    'A10': 125.0,
    'L40S': 362.0,
    'L40': 181.0,
    'L4': 121.0,
    'V100': 125.0,  # fp16 only; no bf16 on Volta
}


def peak_tflops(device_name: Optional[str], override: Optional[float] = None) -> Optional[float]:
    """Peak dense bf16/fp16 TFLOP/s for a device name, `override` if given, None on the CPU or an unknown device."""
    if override is not None:
        if override <= 0:
            raise ValueError(f'peak TFLOP/s override must be positive, got {override}')
        return float(override)
    if not device_name:
        return None
    name = device_name.lower()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in name:
            return PEAK_TFLOPS[key]
    return None


def mfu(images_per_s: float, flops_per_image: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOP utilization in [0, 1]: achieved / peak, for one device's images/s and its peak in TFLOP/s.

    None when the peak is unknown (CPU), so callers print TFLOP/s and no MFU rather than a made-up number.
    """
    if peak is None:
        return None
    return images_per_s * flops_per_image / (peak * 1e12)
