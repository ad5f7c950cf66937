"""Pretraining's weight-decay split (cmae_ds/engine/optim.py) against the groups the official code made: mmengine's
DefaultOptimWrapperConstructor with each official config's paramwise_cfg ('ln', 'bias', 'pos_embed', 'mask_token',
'cls_token' matched as substrings), read from the optimizer of the official Runner that made
tests/fixtures/official_trajectory/ (its 'weight_decay' entry, by official name). The BatchNorm weights of the
projector and predictor decay there; the frozen target branch is in no group. The 'one_dim' switch keeps MAE/timm's
rule (every tensor of at most one dimension exempt)."""

import pytest
from torch import nn
from trajectory_helpers import load_fixture

from cmae_ds.config import ModelConfig, load_config
from cmae_ds.engine.optim import param_groups
from cmae_ds.modelfiles.formats import convert_official_cmae
from cmae_ds.models import CMAE


def decays(groups) -> dict:
    return {n: g['weight_decay'] > 0 for g in groups for n in g['names']}


@pytest.mark.parametrize('mode', ['cmae', 'mae'])
def test_the_groups_are_the_official_ones(mode):
    fx = load_fixture(mode)
    model = CMAE(ModelConfig(**fx['config']))
    groups = param_groups(model, 0.05)
    official = {k: v > 0 for k, v in convert_official_cmae(fx['weight_decay']).items()}
    assert sum(len(g['names']) for g in groups) == len(decays(groups))  # no parameter in two groups
    assert decays(groups) == official
    assert {g['weight_decay'] for g in groups} == {0.05, 0.0}
    if mode == 'cmae':
        assert official['projector.bn0.weight'] and official['predictor.bn0.weight']
        assert not official['projector.bn0.bias'] and not official['encoder.norm.weight']
        targets, _ = model.ema_pairs()
        in_groups = {id(p) for g in groups for p in g['params']}
        assert targets and all(not t.requires_grad and id(t) not in in_groups for t in targets)


@pytest.mark.parametrize('mode', ['cmae', 'mae'])
def test_the_default_rule_is_the_official_one_for_every_size(mode):
    """The debug size has other names than the fixture's (depth, decoder depth): the rule, not a list, decides."""
    cfg = load_config(None, ['model.size=debug', f'model.mode={mode}'])
    assert cfg.train.no_decay == 'official'
    model = CMAE(cfg.model)
    got = decays(param_groups(model, 0.05, cfg.train.no_decay))
    for module_name, module in model.named_modules():
        for leaf, _ in module.named_parameters(recurse=False):
            name = f'{module_name}.{leaf}'
            exempt = isinstance(module, nn.LayerNorm) or leaf in ('bias', 'cls_token', 'mask_token', 'pos_embed')
            assert got[name] == (not exempt), name


def test_one_dim_switch_exempts_every_vector():
    model = CMAE(load_config(None, ['model.size=debug']).model)
    got = decays(param_groups(model, 0.05, 'one_dim'))
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert got[name] == (p.ndim > 1 and not name.endswith(('cls_token', 'mask_token', 'pos_embed'))), name
    assert not got['projector.bn0.weight']
