"""Model files as safetensors (cmae_ds/modelfiles/model_file.py), the exports of launch/convert_checkpoint.py, the
timm-ready encoder and the model cards written beside every export."""

import json
from dataclasses import asdict

import pytest
import torch

from cmae_ds.config import ModelConfig
from cmae_ds.modelfiles import safe_load
from cmae_ds.modelfiles.exports import export
from cmae_ds.modelfiles.formats import (
    ENCODER_FORMAT,
    CheckpointError,
    classifier_from_pretrained,
    load_encoder,
    read_file,
)
from cmae_ds.modelfiles.model_file import is_safetensors, run_model_file, write_model_file
from cmae_ds.models import CMAE, build_encoder

from helpers import debug_cfg

RUN_FACTS = {
    'data': {'source': 'folder', 'root': '/data/imagenet/train'},
    'steps': 1200,
    'epochs': 3.0,
    'final_loss': 0.8125,
    'knn': {'step': 1200, 'top1': 41.5, 'top5': 70.25, 'images': 500},
    'run_dir': '/runs/b300',
    'command': 'deepspeed --num_gpus 8 launch/pretrain.py --config cmae_vit_base_300e',
    'config': {'model': {'size': 'debug'}, 'train': {'epochs': 300}},
}


def end_of_run_payload(cfg: ModelConfig) -> dict:
    return {'format': 'cmae_ds.model', 'state_dict': CMAE(cfg).state_dict(), 'model_config': asdict(cfg)}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_safetensors_round_trip_keeps_weights_and_description_without_a_pickle_scan(tmp_path, monkeypatch):
    cfg = debug_cfg()
    payload = {**end_of_run_payload(cfg), 'run': RUN_FACTS}
    path = write_model_file(payload, tmp_path / 'model.safetensors')
    assert path.read_bytes()[8:9] == b'{' and is_safetensors(path)

    def no_scan(*_):
        raise AssertionError('a safetensors file was scanned as a pickle')

    monkeypatch.setattr(safe_load, 'scan', no_scan)
    monkeypatch.setattr(safe_load.torch, 'load', no_scan)
    loaded = read_file(path)
    assert_same_tensors(loaded['state_dict'], payload['state_dict'])
    assert loaded['model_config'] == asdict(cfg) and loaded['run'] == RUN_FACTS
    assert ModelConfig(**loaded['model_config']) == cfg
    # known by its content too, whatever its name
    renamed = path.rename(tmp_path / 'weights')
    assert is_safetensors(renamed) and read_file(renamed)['format'] == 'cmae_ds.model'


def test_a_pt_name_asks_for_the_pickled_form_which_still_loads_safely(tmp_path):
    cfg = debug_cfg()
    payload = end_of_run_payload(cfg)
    path = write_model_file(payload, tmp_path / 'model.pt')
    assert not is_safetensors(path)
    assert safe_load.scan(path)  # the pickle path: scanned, then read weights-only
    assert_same_tensors(read_file(path)['state_dict'], payload['state_dict'])
    assert run_model_file(tmp_path) == path  # an older run folder: its model.pt
    write_model_file(payload, tmp_path / 'model.safetensors')
    assert run_model_file(tmp_path).name == 'model.safetensors'  # the new name wins


def test_a_damaged_safetensors_file_is_one_clear_error(tmp_path):
    path = write_model_file({'state_dict': {'w': torch.ones(4)}}, tmp_path / 'm.safetensors')
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match='m.safetensors: cannot be read as a safetensors file'):
        read_file(path)
    with pytest.raises(CheckpointError, match='a folder without model.safetensors'):
        run_model_file(tmp_path)


def test_to_safetensors_converts_an_old_model_pt_with_its_card(tmp_path):
    cfg = debug_cfg()
    old = tmp_path / 'model.pt'
    torch.save({'state_dict': CMAE(cfg).state_dict(), 'model_config': asdict(cfg)}, old)  # as pretraining wrote
    lines = export('to-safetensors', str(old), None, [])
    new = tmp_path / 'model.safetensors'
    assert lines[:2] == [f'wrote {new}', f'model card: {tmp_path / "README.md"}']
    converted = read_file(new)
    assert converted['format'] == 'cmae_ds.model' and converted['model_config'] == asdict(cfg)
    assert_same_tensors(converted['state_dict'], torch.load(old, weights_only=True)['state_dict'])
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(load_encoder(new, cfg)(x), load_encoder(old, cfg)(x))
    with pytest.raises(Exception, match='names a pickle format'):
        export('to-safetensors', str(new), str(tmp_path / 'back.pt'), [])


def test_exports_carry_the_run_and_write_a_card_each(tmp_path):
    cfg = debug_cfg()
    (tmp_path / 'run').mkdir()
    src = write_model_file({**end_of_run_payload(cfg), 'run': RUN_FACTS}, tmp_path / 'run' / 'model.safetensors')
    out = tmp_path / 'export'
    export('extract-encoder', str(src), str(out / 'encoder.safetensors'), [])
    export('to-timm', str(src), str(out / 'vit_timm.safetensors'), [])
    encoder = read_file(out / 'encoder.safetensors')
    assert encoder['format'] == ENCODER_FORMAT and encoder['run'] == RUN_FACTS
    assert encoder['model_config'] == asdict(cfg)  # the source's model, not the default ViT-B
    card = (out / 'README.md').read_text()
    assert card.startswith('<!-- cmae_ds model card: encoder.safetensors -->')
    for fact in ('source folder', 'root /data/imagenet/train', '1200 optimizer steps (3 epochs)', 'final loss: 0.8125'):
        assert fact in card, fact
    assert 'at step 1200: top-1 41.5, top-5 70.25' in card
    assert RUN_FACTS['command'] in card and 'epochs: 300' in card
    timm_card = (out / 'vit_timm.README.md').read_text()  # a second model in the folder gets its own card
    assert (
        timm_card.startswith('<!-- cmae_ds model card: vit_timm.safetensors -->') and 'VisionTransformer' in timm_card
    )


def test_pt_exports_keep_their_old_form(tmp_path):
    cfg = debug_cfg()
    src = write_model_file(end_of_run_payload(cfg), tmp_path / 'model.safetensors')
    export('to-timm', str(src), str(tmp_path / 'timm.pth'), [])
    bare = torch.load(tmp_path / 'timm.pth', weights_only=True)
    assert 'blocks.0.attn.qkv.weight' in bare and 'norm.weight' in bare and 'state_dict' not in bare


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt of timm to fetch weights fails the test (and the network is unreachable here anyway)."""
    from timm.models import _builder, _hub

    def refuse(*args, **kwargs):
        raise AssertionError(f'timm tried to download: {args}')

    for module in (_builder, _hub):
        for name in ('download_cached_file', 'load_state_dict_from_hf', 'load_state_dict_from_url', 'hf_hub_download'):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)


@pytest.mark.slow  # two ViT-S/16 at 224 and timm's import: 15-30 s on a loaded 2-core machine
def test_timm_loads_the_export_by_name_and_gives_our_features(tmp_path, no_downloads):
    import timm

    cfg = ModelConfig(size='vit_small', img_size=224)
    encoder = build_encoder(cfg, final_norm=True).eval()
    src = {'format': ENCODER_FORMAT, 'state_dict': encoder.state_dict(), 'model_config': asdict(cfg)}
    src = write_model_file(src, tmp_path / 'encoder.safetensors')
    path = tmp_path / 'vit_s_timm.safetensors'
    lines = export('to-timm', str(src), str(path), [])
    assert any("timm.create_model('vit_small_patch16_224'" in line for line in lines)
    model = timm.create_model(
        'vit_small_patch16_224', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=0
    ).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours, theirs = encoder(x), model.forward_features(x)
        assert torch.allclose(theirs, ours, atol=1e-5, rtol=1e-5)
        assert torch.allclose(model.forward_head(theirs), ours[:, 0], atol=1e-5, rtol=1e-5)  # token pooling, no head
    assert "create_model('vit_small_patch16_224'" in (tmp_path / 'README.md').read_text()


@pytest.mark.parametrize('name', ['model.safetensors', 'pytorch_model.bin'])
def test_finetuning_starts_from_any_timm_vit_of_the_size(tmp_path, name):
    """A timm ViT classifier checkpoint as the Hub holds it (bare state dict with a head): its encoder is taken."""
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    from cmae_ds.modelfiles.formats import timm_kwargs

    cfg = debug_cfg()
    vit = VisionTransformer(**timm_kwargs(cfg, num_classes=10))
    path = tmp_path / name
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    save_file(state, path) if name.endswith('.safetensors') else torch.save(state, path)
    clf = classifier_from_pretrained(path, cfg, 5, img_size=96)
    assert torch.equal(clf.encoder.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    assert clf.encoder.pos_embed.shape[1] == 1 + (96 // cfg.patch_size) ** 2  # resized to the fine-tuning size
    assert clf(torch.randn(2, 3, 96, 96)).shape == (2, 5)


def test_a_runs_card_facts_take_the_last_knn_result_it_logged(tmp_path):
    from cmae_ds.modelfiles.model_card import last_knn, run_facts

    assert last_knn(tmp_path) is None
    lines = [{'step': 100, 'top1': 20.0, 'top5': 50.0}, {'step': 200, 'top1': 31.25, 'top5': 60.0}]
    (tmp_path / 'knn.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in lines))
    cfg = {'data': {'source': 'folder', 'root': '/data/train', 'annotations': ''}, 'train': {'epochs': 3}}
    facts = run_facts(cfg, 200, 2.5, 1.25, tmp_path, last_knn(tmp_path))
    assert facts['knn'] == lines[1] and facts['data'] == {'source': 'folder', 'root': '/data/train'}
    assert (facts['steps'], facts['epochs'], facts['final_loss'], facts['config']) == (200, 2.5, 1.25, cfg)
