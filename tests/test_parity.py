"""The model against outputs of the official CMAE code (../shared/fixtures/official_cmae_parity_a.pt)."""

import os
import subprocess
import sys

import pytest
import torch

from cmae_ds.kernels import configure as configure_kernels
from cmae_ds.modelfiles.formats import load_official_classifier, load_official_cmae

from conftest import FIXTURE_A, ROOT
from helpers import fixture_config, rel


def _run(fx):
    model = load_official_cmae(fx['state_dict'], fixture_config(fx)).train()
    out = model(fx['img'], fx['img_target'], mask=fx['mask'])
    (out['loss_rec'] + out['loss_con']).backward()
    return model, out


def test_losses_and_outputs_match_official(fixture_a):
    _, out = _run(fixture_a)
    ref = fixture_a['out']
    assert rel(out['loss_rec'], ref['loss_rec']) < 1e-5
    assert rel(out['loss_con'], ref['loss_con']) < 1e-5
    assert rel(out['pred_pixel'], ref['pred_pixel']) < 1e-4
    assert rel(out['proj_online'], ref['proj_online']) < 1e-4
    assert rel(out['proj_target'], ref['proj_target']) < 1e-4
    assert torch.allclose(out['loss'], out['loss_rec'] + out['loss_con'])


def test_gradients_match_official(fixture_a):
    model, _ = _run(fixture_a)
    ours = dict(model.named_parameters())
    names = {
        'backbone.patch_embed.projection.weight': 'encoder.patch_embed.proj.weight',
        'backbone.layers.0.attn.qkv.weight': 'encoder.blocks.0.attn.qkv.weight',
        'pixel_decoder.mask_token': 'pixel_decoder.mask_token',
        'feature_decoder.decoder_pred.weight': 'feature_decoder.pred.weight',
        'projector.fc0.weight': 'projector.fc0.weight',
        'head.predictor.fc1.weight': 'predictor.fc1.weight',
    }
    assert set(fixture_a['grads']) == set(names)
    for official, mine in names.items():
        assert torch.equal(ours[mine].detach(), fixture_a['state_dict'][official])
        assert rel(ours[mine].grad, fixture_a['grads'][official]) < 1e-4, official


def test_target_branch_gets_no_gradient(fixture_a):
    model, _ = _run(fixture_a)
    assert all(p.grad is None for p in model.target.parameters())


def test_visible_token_order_does_not_matter(fixture_a):
    """docs/spec.md section 2 allows any order of the visible set; ours is grid order, a shuffled one must agree."""
    model = load_official_cmae(fixture_a['state_dict'], fixture_config(fixture_a)).train()
    from cmae_ds.models.masking import visible_ids

    ids = visible_ids(fixture_a['mask'])
    perm = torch.randperm(ids.shape[1])
    a = model.encoder.forward_visible(fixture_a['img'], ids)
    b = model.encoder.forward_visible(fixture_a['img'], ids[:, perm])
    assert rel(b[:, 1:], a[:, 1:][:, perm]) < 1e-5


def test_classifier_logits_match_official(fixture_a):
    cfg = fixture_config(fixture_a)
    clf = load_official_classifier(fixture_a['classifier']['state_dict'], cfg, fixture_a['config']['num_classes'])
    with torch.no_grad():
        logits = clf.eval()(fixture_a['classifier']['img'])
    assert rel(logits, fixture_a['classifier']['logits']) < 1e-4


@pytest.mark.parametrize('backend', ['math', 'sdpa'])
def test_parity_with_each_attention_backend(fixture_a, backend, monkeypatch):
    from cmae_ds.kernels import last_impl

    monkeypatch.setenv('CMAE_ATTN_BACKEND', backend)
    configure_kernels()  # the environment overrides the switches when they are set
    _, out = _run(fixture_a)
    assert last_impl('attention') == backend
    assert rel(out['pred_pixel'], fixture_a['out']['pred_pixel']) < 1e-4
    assert rel(out['loss_con'], fixture_a['out']['loss_con']) < 1e-5


PARITY_TOOL = FIXTURE_A.parents[1] / 'tools' / 'parity.py'
WHICH_RAN = """
import torch, sys
sys.path.insert(0, 'tests')
from helpers import fixture_config
from cmae_ds.modelfiles.formats import load_official_cmae
from cmae_ds.kernels import last_impl
fx = torch.load(sys.argv[1], weights_only=True)
m = load_official_cmae(fx['state_dict'], fixture_config(fx)).train()
m(fx['img'], fx['img_target'], mask=fx['mask'])['loss'].backward()
m.enable_flat_ema(); m.momentum_update(0.99)
print(','.join(str(last_impl(k)) for k in ('recon_loss', 'visible_embed', 'ema', 'attention')))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    'env,expected',
    [({'TRITON_INTERPRET': '1'}, 'triton,triton,triton,sdpa'), ({'CMAE_FUSED': '0'}, 'reference,reference,loop,math')],
)
def test_official_parity_tool_with_fusion_on_and_off(env, expected, fixture_a):
    """The shared parity tool, run as CI would, with the Triton kernels (interpreted on the CPU) and with every
    fusion switched off; a second process reports which implementation actually ran."""
    run_env = {**os.environ, **env}
    tool = subprocess.run(
        [sys.executable, str(PARITY_TOOL), str(FIXTURE_A)], capture_output=True, text=True, env=run_env, cwd=ROOT
    )
    assert tool.returncode == 0, tool.stdout + tool.stderr
    assert 'parity holds' in tool.stdout
    which = subprocess.run(
        [sys.executable, '-c', WHICH_RAN, str(FIXTURE_A)], capture_output=True, text=True, env=run_env, cwd=ROOT
    )
    assert which.returncode == 0, which.stderr
    assert which.stdout.strip().splitlines()[-1] == expected


def test_the_parity_tool_import_path_holds():
    """../shared/tools/parity.py (and users' scripts) import the model-file API as cmae_ds.checkpoint; a move of the
    modules behind it must keep that name."""
    from cmae_ds import checkpoint
    from cmae_ds.modelfiles import formats

    assert checkpoint.load_official_cmae is formats.load_official_cmae
    assert checkpoint.load_official_classifier is formats.load_official_classifier
