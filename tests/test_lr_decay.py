"""Layer-wise lr decay groups: the formula per parameter, the official no-decay keys, agreement with timm's layer
scales. The groups against the official constructor's own table: tests/test_finetune_official_fixture.py."""

import pytest
import torch

from cmae_ds.config import ModelConfig
from cmae_ds.engine.lr_decay import layer_decay_groups, layer_id, official_name
from cmae_ds.engine.optim import set_lr
from cmae_ds.engine.schedules import Schedule
from cmae_ds.modelfiles.formats import convert_official_classifier
from cmae_ds.models import ViTClassifier

DEPTH = 3
CFG = ModelConfig(size='debug', depth=DEPTH, img_size=32, patch_size=8)


def expected_layer(name: str) -> int:
    if name.startswith(('encoder.patch_embed.', 'encoder.cls_token', 'encoder.pos_embed')):
        return 0
    if name.startswith('encoder.blocks.'):
        return int(name.split('.')[2]) + 1
    assert name.startswith(('fc_norm.', 'head.')), name
    return DEPTH + 1


def expected_no_decay(name: str, p) -> bool:
    """The official config's keys on our names: biases, the blocks' LayerNorms, cls token, position embedding;
    fc_norm's weight is decayed (official configs/fine-tuning/cmae/*.py, paramwise_cfg.custom_keys)."""
    block_norm = name.startswith('encoder.blocks.') and '.norm' in name
    return name.endswith('.bias') or block_norm or name in ('encoder.cls_token', 'encoder.pos_embed')


def by_name(groups):
    return {n: g for g in groups for n in g['names']}


def test_each_parameter_gets_decay_to_the_power_of_its_distance_from_the_head():
    model = ViTClassifier(CFG, num_classes=7)
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=0.65, depth=DEPTH)
    table = by_name(groups)
    assert set(table) == {n for n, _ in model.named_parameters()}
    assert sum(len(g['params']) for g in groups) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        g = table[name]
        assert any(q is p for q in g['params'])
        assert g['layer_id'] == expected_layer(name)
        assert g['lr_scale'] == pytest.approx(0.65 ** (DEPTH + 1 - expected_layer(name)), rel=1e-12)
        assert g['weight_decay'] == (0.0 if expected_no_decay(name, p) else 0.05), name
    assert table['head.weight']['lr_scale'] == 1.0 and table['head.weight']['weight_decay'] == 0.05
    assert table['encoder.pos_embed']['weight_decay'] == 0.0
    assert table['fc_norm.weight']['weight_decay'] == 0.05 and table['fc_norm.bias']['weight_decay'] == 0.0
    assert table['encoder.patch_embed.proj.weight']['lr_scale'] == pytest.approx(0.65**4)


def test_set_lr_gives_each_group_its_peak_and_the_common_floor():
    """mmengine's CosineAnnealingLR: every group decays from its own peak to the same eta_min."""
    model = ViTClassifier(CFG, num_classes=7)
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=0.65, depth=DEPTH)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != 'names'} for g in groups], lr=1.0)
    sched = Schedule(
        peak_lr=2e-3, total_steps=100, warmup_steps=10, steps_per_epoch=10, warmup_start_factor=1e-4, min_lr=1e-6
    )
    set_lr(opt, sched, 10)
    for g in opt.param_groups:
        assert g['lr'] == pytest.approx(2e-3 * 0.65 ** (DEPTH + 1 - g['layer_id']), rel=1e-12)
    set_lr(opt, sched, 100, factor=0.5)
    assert [g['lr'] for g in opt.param_groups] == [pytest.approx(0.5e-6, rel=1e-12)] * len(opt.param_groups)


def test_layer_scales_match_timm_layer_decay_reference():
    """timm's param_groups_layer_decay on a timm ViT with the same names (ours are timm's, under encoder.): the same
    lr scales. Its weight decay differs on purpose: timm exempts every 1-D tensor (fc_norm.weight too)."""
    from timm.models.vision_transformer import VisionTransformer
    from timm.optim._param_groups import param_groups_layer_decay

    vit = VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=DEPTH,
        num_heads=4,
        num_classes=7,
        global_pool='avg',
        fc_norm=True,
        class_token=True,
    )
    ref = param_groups_layer_decay(vit, weight_decay=0.05, no_weight_decay_list=vit.no_weight_decay(), layer_decay=0.65)
    names = {id(p): n for n, p in vit.named_parameters()}
    ref_table = {names[id(p)]: (g['lr_scale'], g['weight_decay']) for g in ref for p in g['params']}
    ours = by_name(
        layer_decay_groups(ViTClassifier(CFG, num_classes=7), weight_decay=0.05, layer_decay=0.65, depth=DEPTH)
    )
    for name, g in ours.items():
        timm_name = name[len('encoder.') :] if name.startswith('encoder.') else name
        scale, wd = ref_table[timm_name]
        assert g['lr_scale'] == pytest.approx(scale), name
        assert g['weight_decay'] == wd or name == 'fc_norm.weight', name


def test_official_name_inverts_the_official_classifier_converter():
    model = ViTClassifier(CFG, num_classes=7)
    names = [n for n, _ in model.named_parameters()]
    official = {official_name(n): n for n in names}
    assert len(official) == len(names)
    assert convert_official_classifier(dict.fromkeys(official)).keys() == set(names)
    assert official_name('encoder.blocks.2.norm1.weight') == 'backbone.layers.2.ln1.weight'
    assert official_name('blocks.2.mlp.fc1.weight') == 'backbone.layers.2.ffn.layers.0.0.weight'


def test_layer_id_of_a_bare_encoder_name():
    assert layer_id('blocks.11.attn.qkv.weight', 12) == 12
    assert layer_id('cls_token', 12) == 0
    assert layer_id('norm.weight', 12) == 13
