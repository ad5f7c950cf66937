import math

import pytest
import torch

from cmae_ds.config import ENCODER_SIZES, ConfigError, ModelConfig
from cmae_ds.models import (
    CMAE,
    ViTClassifier,
    block_mask,
    interpolate_pos_embed,
    patch_mask,
    patchify,
    sincos_pos_embed_2d,
    unpatchify,
    visible_ids,
)
from cmae_ds.models.cmae import build_encoder

from helpers import debug_cfg, rel


def test_block_mask_hides_whole_aligned_blocks_and_same_count():
    g = torch.Generator().manual_seed(1)
    mask = block_mask(64, 14, 0.65, generator=g)  # ViT-B/16 at 224
    assert mask.shape == (64, 196) and mask.dtype == torch.bool
    assert ((~mask).sum(1) == 68).all()  # 17 of 49 blocks kept, docs/spec.md section 2
    blocks = mask.view(64, 7, 2, 7, 2)
    assert (blocks == blocks[:, :, :1, :, :1]).all()  # constant inside each 2x2 block


def test_block_mask_is_uniform_over_blocks():
    mask = block_mask(4000, 8, 0.65, generator=torch.Generator().manual_seed(2))
    per_block = mask.view(4000, 4, 2, 4, 2)[:, :, 0, :, 0].float().mean(0)  # 16 blocks
    expected = 1 - int(16 * 0.35) / 16
    assert (per_block - expected).abs().max() < 0.04


def test_patch_mask_ratio_and_determinism():
    a = patch_mask(16, 196, 0.75, generator=torch.Generator().manual_seed(3))
    b = patch_mask(16, 196, 0.75, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert ((~a).sum(1) == 49).all()
    assert mask_differs_between_samples(a)


def mask_differs_between_samples(mask):
    return not (mask == mask[:1]).all()


def test_visible_ids_in_grid_order_and_unequal_counts_rejected():
    mask = torch.tensor([[True, False, True, False], [False, True, True, False]])
    assert visible_ids(mask).tolist() == [[1, 3], [0, 3]]
    with pytest.raises(ValueError, match='same number'):
        visible_ids(torch.tensor([[True, False], [False, False]]))


def test_patchify_layout_and_round_trip():
    img = torch.randn(2, 3, 32, 48)
    p = patchify(img, 16)
    assert p.shape == (2, 6, 16 * 16 * 3)
    # patch 4 = grid row 1, column 1; element (row 2, col 5, channel 1) sits at (2 * 16 + 5) * 3 + 1
    assert p[1, 4, (2 * 16 + 5) * 3 + 1] == img[1, 1, 16 + 2, 16 + 5]
    sq = torch.randn(2, 3, 32, 32)
    assert torch.equal(unpatchify(patchify(sq, 8), 8), sq)


@pytest.mark.parametrize('mode', ['cmae', 'mae'])
def test_forward_backward_debug(mode):
    cfg = debug_cfg(mode=mode)
    model = CMAE(cfg).train()
    img, img_t = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    out = model(img, img_t, generator=torch.Generator().manual_seed(0))
    assert out['pred_pixel'].shape == (4, 16, 16 * 16 * 3)
    assert out['mask'].sum(1).tolist() == [16 - cfg.num_visible] * 4
    out['loss'].backward()
    assert torch.isfinite(out['loss'])
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if mode == 'mae':
        assert model.target is None and 'loss_con' not in out
        assert not hasattr(model, 'feature_decoder')
        assert cfg.mask_ratio == 0.75
    else:
        assert float(out['loss'].detach()) == pytest.approx(
            float((out['loss_rec'] + out['loss_con']).detach()), rel=1e-6
        )


def encoder_params_by_hand(s) -> int:
    d, h = s.embed_dim, int(s.embed_dim * s.mlp_ratio)
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)
    return s.patch_size**2 * 3 * d + d + d + s.depth * block + 2 * d  # patch conv, cls, blocks, final norm


@pytest.mark.parametrize('size', list(ENCODER_SIZES))
def test_named_size_parameter_counts(size):
    cfg = ModelConfig(size=size, img_size=224)
    with torch.device('meta'):
        enc = build_encoder(cfg, final_norm=True)
    assert sum(p.numel() for p in enc.parameters()) == encoder_params_by_hand(ENCODER_SIZES[size])


def test_vit_base_matches_published_count():
    cfg = ModelConfig(size='vit_base')
    with torch.device('meta'):
        enc = build_encoder(cfg, final_norm=True)
    # timm vit_base_patch16_224 without head: 85,798,656 including its 151,296 position-embedding values
    assert sum(p.numel() for p in enc.parameters()) + enc.pos_embed.numel() == 85_798_656


def test_momentum_update_against_hand_computation():
    model = CMAE(debug_cfg())
    targets, sources = model.ema_pairs()
    assert len(targets) == len(sources) > 10
    with torch.no_grad():
        for t in targets:
            t.add_(torch.randn_like(t))
    before = [t.clone() for t in targets]
    model.momentum_update(0.9)
    for t, t0, s in zip(targets, before, sources):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-6)
    names = [n for n, _ in model.target.named_parameters()]
    assert not any(n.startswith('encoder.norm') for n in names)


def test_target_starts_as_copy_and_stays_fp32_under_casts():
    model = CMAE(debug_cfg())
    targets, sources = model.ema_pairs()
    assert all(torch.equal(t, s) for t, s in zip(targets, sources))
    model.to(torch.bfloat16)
    assert model.encoder.cls_token.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in model.target.parameters())
    model.float()
    # a bf16 EMA step moves the fp32 target by the fp32 amount, which bf16 storage could not represent
    t = targets[0]
    with torch.no_grad():
        t.add_(1e-3)
    before = t.clone()
    model.momentum_update(0.996)
    expected = 0.996 * before + 0.004 * sources[0]
    assert torch.allclose(t, expected, atol=1e-7)
    assert not torch.equal(t, before)


def test_bf16_forward_runs_with_fp32_target():
    model = CMAE(debug_cfg()).to(torch.bfloat16).train()
    img = torch.randn(4, 3, 64, 64, dtype=torch.bfloat16)
    out = model(img, img.clone())
    assert out['proj_target'].dtype == torch.float32
    out['loss'].backward()
    assert torch.isfinite(out['loss'].float())


def test_state_dict_round_trip_includes_target():
    a = CMAE(debug_cfg())
    with torch.no_grad():
        for t in a.target.parameters():
            t.normal_()
    sd = a.state_dict()
    assert any(k.startswith('target_encoder.blocks.0') for k in sd)
    assert any(k.startswith('target_projector.bn0.running_var') for k in sd)
    b = CMAE(debug_cfg())
    b.load_state_dict(sd)
    for (n, x), y in zip(a.target.named_parameters(), b.target.parameters()):
        assert torch.equal(x, y), n
    del sd['target_encoder.cls_token']
    with pytest.raises(RuntimeError, match='target_encoder.cls_token'):
        CMAE(debug_cfg()).load_state_dict(sd)


def test_activation_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    plain = CMAE(debug_cfg()).train()
    ckpt = CMAE(debug_cfg(activation_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    img, img_t = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    mask = plain.random_mask(4, 'cpu', torch.Generator().manual_seed(5))
    for m in (plain, ckpt):
        m(img, img_t, mask=mask)['loss'].backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), n


def test_sincos_layout_rows_then_columns():
    pos = sincos_pos_embed_2d(4, 16)[0]
    assert torch.equal(pos[0], torch.zeros(16))
    # patch (row 1, col 2) is index 1 + 1*4 + 2; first quarter sin(row * 1), third quarter sin(col * 1)
    assert pos[1 + 4 + 2, 0] == pytest.approx(math.sin(1.0))
    assert pos[1 + 4 + 2, 8] == pytest.approx(math.sin(2.0))


def test_pos_embed_interpolation():
    pos = sincos_pos_embed_2d(14, 64)
    assert interpolate_pos_embed(pos, 14) is pos
    big = interpolate_pos_embed(pos, 24)
    assert big.shape == (1, 1 + 24 * 24, 64)
    assert torch.equal(big[:, 0], pos[:, 0])
    # corners of the grid keep approximately their values; the embedding is smooth in its low frequencies
    assert rel(big[0, 1, 32:], pos[0, 1, 32:]) < 0.2
    back = interpolate_pos_embed(big, 14)
    assert rel(back[..., 16:32], pos[..., 16:32]) < 0.05  # the slowest row frequencies survive a round trip


def test_classifier_at_another_resolution():
    cfg = debug_cfg()
    clf = ViTClassifier(cfg, 5, img_size=96, drop_path=0.1).train()
    out = clf(torch.randn(2, 3, 96, 96))
    assert out.shape == (2, 5)
    assert clf.encoder.pos_embed.requires_grad and clf.encoder.pos_embed.shape[1] == 1 + 36


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match='model.size'):
        ModelConfig(size='vit_tiny')
    with pytest.raises(ConfigError, match='img_size'):
        ModelConfig(size='vit_base', img_size=230)
    with pytest.raises(ConfigError, match='unknown key'):
        ModelConfig.from_dict({'sise': 'vit_base'})
    with pytest.raises(ConfigError, match='even patch grid'):
        ModelConfig(size='debug', img_size=48)


def test_target_encoder_runs_in_the_callers_autocast_dtype_with_fp32_weights():
    """As the official code under autocast: the target forward in bf16 even from fp32 views; the EMA weights stay
    fp32. Without autocast, fp32 views give an fp32 target forward."""
    model = CMAE(debug_cfg())
    seen = []
    model.target.encoder.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    img = torch.randn(2, 3, 64, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        model(img, img.clone())
    model(img, img.clone())
    assert seen == [torch.bfloat16, torch.float32]
    assert all(p.dtype == torch.float32 for p in model.target.parameters())
