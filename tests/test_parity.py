"""The model against outputs of the official CMAE code (../shared/fixtures/official_cmae_parity_a.pt)."""
import pytest
import torch

from cmae_ds.checkpoint import load_official_cmae, load_official_classifier
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
    """The spec allows any order of the visible set; ours is grid order, a shuffled one must agree."""
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
    pytest.importorskip('cmae_ds.kernels.attention')
    monkeypatch.setenv('CMAE_ATTN_BACKEND', backend)
    _, out = _run(fixture_a)
    assert rel(out['pred_pixel'], fixture_a['out']['pred_pixel']) < 1e-4
    assert rel(out['loss_con'], fixture_a['out']['loss_con']) < 1e-5
