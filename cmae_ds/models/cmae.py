"""CMAE (and plain MAE as a config switch): online branch trained by gradient, target branch by EMA only."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from ..config import DECODER_MLP_RATIO, ModelConfig
from ..kernels import FlatEMA, fused_enabled, record
from ..kernels.ema import MasterEMA, Zero3MasterEMA, master_groups, zero3_groups
from .batchnorm import keep_dtype
from .decoder import MAEDecoder
from .heads import ProjectionMLP
from .losses import contrastive_loss, reconstruction_loss
from .masking import block_mask, patch_mask, visible_ids
from .vit import build_encoder, official_mae_init

TARGET_PREFIXES = ('target_encoder.', 'target_projector.')


def build_decoder(cfg: ModelConfig, depth: int, out_dim: int) -> MAEDecoder:
    return MAEDecoder(
        grid=cfg.grid_size,
        in_dim=cfg.embed_dim,
        dim=cfg.decoder_embed_dim,
        depth=depth,
        num_heads=cfg.decoder_num_heads,
        mlp_ratio=DECODER_MLP_RATIO,
        out_dim=out_dim,
    )


class TargetBranch(nn.Module):
    """Momentum encoder (no final norm) and momentum projector. Kept in fp32 and never given gradients."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.encoder = build_encoder(cfg, final_norm=False)
        self.projector = ProjectionMLP(cfg.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.requires_grad_(False)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, proj_dim) fp32, from the mean of the patch tokens (cls excluded).

        The encoder runs in the compute dtype of the step while its weights stay fp32: under autocast for bf16 or
        fp16 inputs (DeepSpeed's bf16/fp16 engines), and under the caller's autocast whatever the input dtype (an
        enclosing autocast is left in force, as in the official code); fp32 otherwise."""
        low_precision = img.dtype in (torch.bfloat16, torch.float16)
        cast = torch.autocast(img.device.type, dtype=img.dtype) if low_precision else contextlib.nullcontext()
        with cast:
            pooled = self.encoder(img)[:, 1:].mean(dim=1)
        return self.projector(pooled.float())


class CMAE(nn.Module):
    """CMAE pretraining model (docs/spec.md sections 2-6). `cfg.mode == 'mae'` gives the MAE baseline (pixel branch
    only).

    The target branch is deliberately not a registered submodule: DeepSpeed casts and partitions every registered
    parameter, and an EMA with m = 0.996 stalls in bf16 (docs/spec.md section 6). It follows .to()/.train() and
    appears in state_dict()/load_state_dict() under `target_encoder.` / `target_projector.`, in fp32.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        patch_dim = cfg.patch_size**2 * cfg.in_chans
        self.encoder = build_encoder(cfg, final_norm=True, drop_path=cfg.drop_path)
        if cfg.mode == 'mae':
            official_mae_init(self.encoder)
        self.pixel_decoder = build_decoder(cfg, cfg.decoder_depth, patch_dim)
        target = None
        if cfg.mode == 'cmae':
            self.feature_decoder = build_decoder(cfg, cfg.feature_decoder_depth, cfg.embed_dim)
            self.projector = ProjectionMLP(cfg.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim)
            self.predictor = ProjectionMLP(cfg.proj_dim, cfg.proj_hidden_dim, cfg.proj_dim)
            target = TargetBranch(cfg)
        object.__setattr__(self, 'target', target)
        object.__setattr__(self, '_flat_ema', None)  # see enable_flat_ema
        object.__setattr__(self, '_master_ema', None)  # see enable_master_ema
        self.set_activation_checkpointing(cfg.activation_checkpointing)
        self._register_state_dict_hook(_add_target_state)
        self._register_load_state_dict_pre_hook(_load_target_state, with_module=True)
        if target is not None:
            self.copy_online_to_target()

    # --- masking -----------------------------------------------------------------------------------------------
    def random_mask(self, batch: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(N, L) bool, True = hidden: 2x2 blocks for CMAE, single patches for MAE."""
        cfg = self.cfg
        if cfg.mode == 'cmae':
            return block_mask(batch, cfg.grid_size, cfg.mask_ratio, device=device, generator=generator)
        return patch_mask(batch, cfg.num_patches, cfg.mask_ratio, device=device, generator=generator)

    # --- forward -----------------------------------------------------------------------------------------------
    def forward(
        self,
        img: torch.Tensor,
        img_target: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> dict:
        """img, img_target (N, C, H, W); mask (N, L) bool True = hidden, drawn here when None.

        Returns loss, loss_rec, loss_con (CMAE), pred_pixel (N, L, p*p*C), mask, proj_online / proj_target (N, d).
        """
        if mask is None:
            mask = self.random_mask(img.shape[0], img.device, generator)
        else:  # checked on the device: no host sync, and nothing that breaks a compiled graph
            mask = mask.to(img.device)
        ids_keep = visible_ids(mask, self.cfg.num_visible, check=True)
        latent = self.encoder.forward_visible(img, ids_keep)  # (N, 1 + K, D)
        pred = self.pixel_decoder(latent, ids_keep, mask)  # (N, L, p*p*C)
        loss_rec = reconstruction_loss(img, pred, mask, self.cfg.patch_size)
        out = {'pred_pixel': pred, 'mask': mask, 'loss_rec': loss_rec}
        if self.target is None:
            out['loss'] = self.cfg.loss_rec_weight * loss_rec
            return out
        if img_target is None:
            raise ValueError('CMAE needs img_target (the shifted, colour-augmented view)')
        out.update(self.forward_contrastive(latent, ids_keep, mask, img_target))
        out['loss'] = self.cfg.loss_rec_weight * loss_rec + self.cfg.loss_con_weight * out['loss_con']
        return out

    def forward_contrastive(
        self, latent: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor, img_target: torch.Tensor
    ) -> dict:
        feat = self.feature_decoder(latent, ids_keep, mask)  # (N, L, D)
        proj_online = self.projector(feat.mean(dim=1))  # (N, d)
        pred_online = self.predictor(proj_online)
        with torch.no_grad():
            proj_target = self.target(img_target)  # (N, d) fp32
        loss_con = contrastive_loss(pred_online, proj_target, self.cfg.temperature)
        return {'loss_con': loss_con, 'proj_online': proj_online, 'proj_target': proj_target}

    # --- momentum branch -------------------------------------------------------------------------------------------
    def ema_pairs(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(target params, matching online params): encoder (less its final norm) and projector, same order."""
        online = dict(self.encoder.named_parameters(prefix='encoder'))
        online.update(self.projector.named_parameters(prefix='projector'))
        targets, sources = [], []
        for name, t in self.target.named_parameters():
            targets.append(t)
            sources.append(online[name])
        return targets, sources

    @torch.no_grad()
    def momentum_update(self, m: float, online: Optional[list[torch.Tensor]] = None) -> None:
        """target = m * target + (1 - m) * online.

        One launch over flat buffers when `enable_flat_ema()` laid them out, else one foreach call over every
        target tensor; CMAE_FUSED_EMA=0 gives the plain per-tensor loop. `online` replaces the module's online
        parameters (in ema_pairs order), e.g. full values gathered from ZeRO-3 partitions.
        """
        if online is None and self._master_ema is not None:
            self._master_ema.update(m)
            return
        if online is None and self._flat_ema is not None and fused_enabled('ema'):
            self._flat_ema.update(m)
            return
        targets, sources = self.ema_pairs()
        sources = online if online is not None else sources
        sources = [s.detach().to(t.dtype) for s, t in zip(sources, targets)]
        if fused_enabled('ema'):
            record('ema', 'foreach')
            torch._foreach_lerp_(targets, sources, 1.0 - m)
        else:
            record('ema', 'loop')
            for t, s in zip(targets, sources):
                t.lerp_(s, 1.0 - m)

    def enable_flat_ema(self) -> None:
        """Lay target and online weights out in flat buffers for a one-launch EMA (cmae_ds.kernels.FlatEMA).
        Call it once the module is on its device and wrapped: moving or re-wrapping afterwards breaks the layout
        (FlatEMA then raises)."""
        if self.target is None:
            return
        flat = FlatEMA(*self.ema_pairs())
        # Under ZeRO-1/2 or DeepSpeed's bf16 optimizer the online weights are views of DeepSpeed's own flat
        # buffers and cannot be laid out again; the foreach update below is then the fast path.
        object.__setattr__(self, '_flat_ema', flat if flat.flat else None)

    def enable_master_ema(self, optimizer) -> bool:
        """The EMA from the fp32 master weights of DeepSpeed's `optimizer` (cmae_ds.kernels.ema: MasterEMA under
        ZeRO-1/2, Zero3MasterEMA under ZeRO-3), in one launch per parameter group; False (nothing changed) where the
        optimizer keeps none on the device."""
        if self.target is None or not fused_enabled('ema'):
            return False
        groups, kind = master_groups(optimizer), MasterEMA
        if groups is None:
            groups, kind = zero3_groups(optimizer), Zero3MasterEMA
        if groups is None:
            return False
        object.__setattr__(self, '_master_ema', kind(*self.ema_pairs(), groups))
        return True

    @property
    def ema_from_master(self) -> bool:
        return self._master_ema is not None

    @torch.no_grad()
    def copy_online_to_target(self) -> None:
        targets, sources = self.ema_pairs()
        torch._foreach_copy_(targets, [s.detach().to(t.dtype) for s, t in zip(sources, targets)])
        self.target.encoder.pos_embed.copy_(self.encoder.pos_embed)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        for module in self.modules():
            if hasattr(module, 'checkpointing'):
                module.checkpointing = enabled

    # --- keep the target branch in fp32 on the model's device ------------------------------------------------------
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.target is not None:
            self.target._apply(lambda t: keep_dtype(fn, t), recurse)  # the target stays fp32
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self.target is not None:
            self.target.train(mode)
        return self


def _add_target_state(module: CMAE, state_dict: dict, prefix: str, local_metadata) -> None:
    if module.target is None:
        return
    for name, value in module.target.state_dict().items():
        state_dict[prefix + 'target_' + name] = value


def _load_target_state(
    module: CMAE,
    state_dict: dict,
    prefix: str,
    local_metadata,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    if module.target is None:
        return
    own = {}
    for key in [k for k in state_dict if k.startswith(prefix + 'target_')]:
        own[key[len(prefix) + len('target_') :]] = state_dict.pop(key)
    result = module.target.load_state_dict(own, strict=False)
    missing_keys.extend(prefix + 'target_' + k for k in result.missing_keys)
    unexpected_keys.extend(prefix + 'target_' + k for k in result.unexpected_keys)
