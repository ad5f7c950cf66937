"""Pretraining's weight-decay split (cmae_ds/engine/optim.py), parameter by parameter against the documented rule
(README, docs/spec.md section 8): no decay on norms, biases, the position embeddings, the cls and mask tokens;
decay on every other weight; the frozen target branch in no group."""

import pytest
from torch import nn

from cmae_ds.config import load_config
from cmae_ds.engine.optim import param_groups
from cmae_ds.models import CMAE

NORMS = (nn.LayerNorm, nn.modules.batchnorm._NormBase)
TOKENS = ('pos_embed', 'decoder_pos_embed', 'cls_token', 'mask_token')


def documented_decay(model: nn.Module) -> dict:
    """{name: decays?} from each parameter's module type and name, not from its shape."""
    out = {}
    for module_name, module in model.named_modules():
        for leaf, _ in module.named_parameters(recurse=False):
            name = f'{module_name}.{leaf}' if module_name else leaf
            out[name] = not (isinstance(module, NORMS) or leaf == 'bias' or leaf in TOKENS)
    return out


@pytest.mark.parametrize('mode', ['cmae', 'mae'])
def test_every_parameter_decays_as_documented_and_the_target_is_in_no_group(mode):
    model = CMAE(load_config(None, ['model.size=debug', f'model.mode={mode}']).model)
    groups = param_groups(model, 0.05)
    got = {n: g['weight_decay'] > 0 for g in groups for n in g['names']}
    want = documented_decay(model)
    assert sum(len(g['names']) for g in groups) == len(got)  # no parameter in two groups
    assert got == want
    assert {g['weight_decay'] for g in groups} == {0.05, 0.0}
    # the rule's every branch is exercised by this model
    kinds = {n.split('.')[-1] for n, decays in want.items() if not decays}
    assert {'bias', 'weight', 'cls_token', 'mask_token'} <= kinds
    in_groups = {id(p) for g in groups for p in g['params']}
    if mode == 'cmae':
        targets, _ = model.ema_pairs()
        assert targets and all(not t.requires_grad and id(t) not in in_groups for t in targets)
        assert any(n.startswith('projector.bn') for n, decays in want.items() if not decays)  # BatchNorm
    else:
        assert model.target is None
