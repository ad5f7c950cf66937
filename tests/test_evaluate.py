"""Evaluation: the official fine-tuned classifier of the fixture gives the fixture's logits through the evaluate
path; padded samples are not counted; our model files round-trip; wrong checkpoints give clear errors."""

import pytest
import torch

from cmae_ds.config import ConfigError, ModelConfig
from cmae_ds.modelfiles.classifier import load_classifier, save_classifier_file
from cmae_ds.modelfiles.formats import CheckpointError
from cmae_ds.models import ViTClassifier
from cmae_ds.tasks.evaluate import check_labels, evaluate

from helpers import fixture_config, rel


@pytest.fixture(scope='module')
def official_file(tmp_path_factory, fixture_a):
    path = tmp_path_factory.mktemp('official') / 'cmae_fine.pth'
    torch.save({'meta': {'epoch': 100}, 'state_dict': fixture_a['classifier']['state_dict']}, path)
    return path


def test_official_classifier_gives_the_fixture_logits(official_file, fixture_a):
    cfg = fixture_config(fixture_a)
    loaded = load_classifier(official_file, cfg, num_classes=10)
    assert (loaded.num_classes, loaded.img_size) == (10, 64) and 'official' in loaded.description
    model = loaded.model.eval()
    img, want = fixture_a['classifier']['img'], fixture_a['classifier']['logits']
    seen = []

    def forward(x):
        seen.append(model(x))
        return seen[-1]

    ranked = want.argsort(dim=1, descending=True)
    result = evaluate(
        forward,
        [{'img': img, 'label': ranked[:, 0], 'index': torch.arange(8)}],
        torch.device('cpu'),
        keep_predictions=True,
    )
    assert rel(seen[0], want) < 1e-4
    assert (result.top1, result.top5, result.images) == (100.0, 100.0, 8)
    assert [p for _, p, _ in result.predictions] == ranked[:, 0].tolist()
    assert result.loss == pytest.approx(torch.nn.functional.cross_entropy(want, ranked[:, 0]).item(), rel=1e-4)
    # the fifth-best class counts for top-5 only; the sixth for neither
    for k, top1, top5 in ((4, 0.0, 100.0), (5, 0.0, 0.0)):
        r = evaluate(model, [{'img': img, 'label': ranked[:, k]}], torch.device('cpu'))
        assert (r.top1, r.top5) == (top1, top5)


def test_padded_samples_are_not_counted():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
    batches = [
        {'img': logits[:2], 'label': torch.tensor([0, 1]), 'valid': torch.tensor([True, True])},
        {'img': logits[2:], 'label': torch.tensor([0, 1]), 'valid': torch.tensor([True, False])},
    ]
    result = evaluate(lambda x: x, batches, torch.device('cpu'))
    assert (result.images, result.top1) == (3, 100.0)


@pytest.mark.parametrize('name', ['model_best.safetensors', 'model_best.pt'])  # the file format, and the older one
def test_our_model_file_round_trips(tmp_path, name):
    cfg = ModelConfig(size='debug', img_size=32, patch_size=8)
    model = ViTClassifier(cfg, 3, img_size=48)
    save_classifier_file(
        tmp_path / name,
        model.state_dict(),
        kind='finetune',
        model_cfg=cfg,
        num_classes=3,
        img_size=48,
        extra={'epoch': 4},
    )
    loaded = load_classifier(tmp_path)  # a run folder means its best model file; the file describes the model
    assert (loaded.img_size, loaded.num_classes) == (48, 3) and 'epoch 4' in loaded.description
    x = torch.randn(2, 3, 48, 48)
    assert torch.equal(loaded.model.eval()(x), model.eval()(x))


def test_clear_errors(tmp_path, official_file, fixture_a):
    with pytest.raises(ConfigError, match='10-way head'):
        load_classifier(official_file, fixture_config(fixture_a), num_classes=1000)
    with pytest.raises(ConfigError, match='does not describe its model'):
        load_classifier(official_file)
    torch.save({'state_dict': fixture_a['state_dict']}, tmp_path / 'pretrain.pth')
    with pytest.raises(CheckpointError, match='not a fine-tuned classifier'):
        load_classifier(tmp_path / 'pretrain.pth', fixture_config(fixture_a))
    with pytest.raises(CheckpointError, match='without model_best.safetensors'):
        load_classifier(tmp_path)
    with pytest.raises(ConfigError, match=r'val_data: 1 of 2 images .* label -1 \(this source has no labels\)'):
        check_labels([('a.jpg', 0), ('b.jpg', -1)], 2, 'val_data')
