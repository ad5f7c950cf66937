import pickle
import subprocess
import sys

import pytest
import torch

from cmae_ds.modelfiles.formats import (
    CheckpointError,
    build_timm_vit,
    classifier_from_pretrained,
    encoder_state,
    extract_encoder,
    load_encoder,
    load_official_cmae,
)
from cmae_ds.modelfiles.safe_load import load_checkpoint_file
from cmae_ds.models import CMAE

from helpers import debug_cfg, fixture_config, rel, save_official_like


def damaged(fx, change):
    sd = dict(fx['state_dict'])
    change(sd)
    return sd


def test_missing_unexpected_and_misshaped_keys_are_listed(fixture_a):
    cfg = fixture_config(fixture_a)

    def damage(sd):
        del sd['backbone.layers.1.attn.qkv.weight']
        sd['backbone.extra_thing'] = torch.zeros(1)
        sd['pixel_decoder.decoder_pred.weight'] = torch.zeros(5, 5)

    with pytest.raises(CheckpointError) as err:
        load_official_cmae(damaged(fixture_a, damage), cfg)
    msg = str(err.value)
    assert 'encoder.blocks.1.attn.qkv.weight' in msg and 'missing' in msg
    assert 'encoder.extra_thing' in msg and 'unexpected' in msg
    assert 'pixel_decoder.pred.weight (5, 5)' in msg
    assert 'embed_dim=192' in msg  # names the config it expected


def test_wrong_config_is_one_clear_error(fixture_a):
    with pytest.raises(CheckpointError, match='wrong shape'):
        load_official_cmae(fixture_a['state_dict'], debug_cfg())


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match='no such file'):
        load_official_cmae(tmp_path / 'nope.pth', debug_cfg())
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='bad.pth'):
        load_official_cmae(bad, debug_cfg())


def test_bare_and_wrapped_official_state_dicts(fixture_a, tmp_path):
    cfg = fixture_config(fixture_a)
    path = tmp_path / 'official.pth'
    torch.save({'state_dict': fixture_a['state_dict'], 'meta': {'epoch': 1}}, path)
    a = load_official_cmae(path, cfg)
    b = load_official_cmae(dict(fixture_a['state_dict']), cfg)
    assert torch.equal(a.target.encoder.blocks[0].attn.qkv.weight, b.target.encoder.blocks[0].attn.qkv.weight)
    assert torch.equal(
        a.target.encoder.blocks[0].attn.qkv.weight, fixture_a['state_dict']['target_backbone.layers.0.attn.qkv.weight']
    )


def test_official_extracted_backbone_and_our_extraction_agree(fixture_a, tmp_path):
    cfg = fixture_config(fixture_a)
    official_extract = {
        'state_dict': {
            k[len('backbone.') :]: v for k, v in fixture_a['state_dict'].items() if k.startswith('backbone.')
        }
    }
    model = load_official_cmae(fixture_a['state_dict'], cfg)
    path = tmp_path / 'encoder.pth'
    torch.save(extract_encoder(model.state_dict(), cfg), path)
    enc_official = load_encoder(official_extract, cfg).eval()
    enc_ours = load_encoder(path, cfg).eval()
    img = fixture_a['img']
    with torch.no_grad():
        assert torch.equal(enc_official(img), enc_ours(img))
        assert rel(enc_ours(img), model.encoder.eval()(img)) < 1e-6


def test_timm_export_gives_the_same_features():
    pytest.importorskip('timm')
    cfg = debug_cfg()
    model = CMAE(cfg).eval()
    timm_vit = build_timm_vit(encoder_state(model.state_dict()), cfg).eval()
    img = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert rel(timm_vit.forward_features(img), model.encoder(img)) < 1e-5


def test_classifier_from_pretrained_resizes_and_drops_final_norm(fixture_a):
    cfg = fixture_config(fixture_a)
    clf = classifier_from_pretrained(fixture_a['state_dict'], cfg, 7, img_size=96, drop_path=0.1)
    assert clf.encoder.pos_embed.shape[1] == 1 + 12 * 12
    assert torch.equal(
        clf.encoder.blocks[3].mlp.fc2.weight, fixture_a['state_dict']['backbone.layers.3.ffn.layers.1.weight']
    )
    assert clf(torch.randn(2, 3, 96, 96)).shape == (2, 7)


@pytest.mark.slow
def test_convert_tool_extracts_and_exports(fixture_a, tmp_path):
    src = tmp_path / 'official.pth'
    torch.save(fixture_a['state_dict'], src)
    cfg_args = [f'model.{k}={v}' for k, v in fixture_a['config'].items() if k not in ('batch', 'num_classes')]
    for what in ('official-to-ours', 'extract-encoder', 'to-timm'):
        out = tmp_path / f'{what}.pth'
        run = subprocess.run(
            [sys.executable, 'launch/convert_checkpoint.py', what, str(src), str(out), *cfg_args],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr
        assert out.exists() and str(out) in run.stdout
    timm_sd = torch.load(tmp_path / 'to-timm.pth', weights_only=True)
    assert 'blocks.0.attn.qkv.weight' in timm_sd and 'norm.weight' in timm_sd
    bad = subprocess.run(
        [
            sys.executable,
            'launch/convert_checkpoint.py',
            'extract-encoder',
            str(tmp_path / 'missing.pth'),
            str(tmp_path / 'x.pth'),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and 'missing.pth' in bad.stderr and 'Traceback' not in bad.stderr


def test_official_checkpoint_with_foreign_metadata_loads_without_importing_it(fixture_a, tmp_path):
    """mmengine checkpoints carry objects of packages we do not install; weights_only refuses them, and we take the
    weights out with the metadata as inert placeholders (payloads in such files: tests/test_safe_load.py)."""
    path = tmp_path / 'official.pth'
    save_official_like(path, fixture_a['state_dict'])
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    model = load_official_cmae(path, fixture_config(fixture_a))
    assert torch.equal(model.encoder.cls_token, fixture_a['state_dict']['backbone.cls_token'])
    meta = load_checkpoint_file(path)['meta']
    assert int(meta['epoch']) == 300 and 'mmengine' not in sys.modules
    assert meta['message_hub']['runtime_info'].state == {'epoch': 300}
