"""kNN evaluator: high accuracy on separable classes, chance with shuffled labels; the pretraining monitor."""

import json

import pytest
import torch
import torch.nn.functional as F

from cmae_ds.config import DataConfig, KnnConfig, KnnMonitorConfig, ModelConfig
from cmae_ds.models import CMAE
from cmae_ds.tasks.knn import KnnEvaluator, KnnMonitor, knn_accuracy, knn_predict, mean_patch_features

from engine_helpers import TINY, run_python, tail, write_ds
from finetune_helpers import write_class_folder

CFG = ModelConfig(size='debug', img_size=32, patch_size=8, decoder_depth=1)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('knn')
    return write_class_folder(root / 'train', [10] * 4, seed=1), write_class_folder(root / 'val', [6] * 4, seed=2)


def folder_cfg(root, **kw):
    return DataConfig(source='folder', root=str(root), pipeline='torch', num_workers=0, **kw)


def test_weighted_vote_follows_dino():
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1])
    query = F.normalize(torch.tensor([[0.6, 0.4]]), dim=1)
    scores = knn_predict(train, labels, query, num_classes=2, k=2, temperature=0.07)
    sims = query @ train.T
    top = sims[0].topk(2)
    expect = torch.zeros(2).index_add_(0, labels[top.indices], (top.values / 0.07).exp())
    assert torch.allclose(scores[0], expect)


def test_clusters_are_found_and_shuffled_labels_are_chance():
    gen = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(10, 32, generator=gen), dim=1)

    def sample(n):
        y = torch.arange(n) % 10
        return F.normalize(centers[y] + 0.1 * torch.randn(n, 32, generator=gen), dim=1), y

    (xt, yt), (xv, yv) = sample(500), sample(200)
    assert knn_accuracy((xt, yt), (xv, yv), 10).top1 > 95
    shuffled = yt[torch.randperm(500, generator=gen)]
    assert knn_accuracy((xt, shuffled), (xv, yv), 10).top1 < 25


def test_encoder_features_of_separable_images(folders, tmp_path):
    train_root, val_root = folders
    encoder = CMAE(CFG).encoder.eval()  # untrained: the colours alone separate the classes
    evaluator = KnnEvaluator(
        KnnConfig(batch_size=16), folder_cfg(train_root), folder_cfg(val_root), 32, 0, 1, torch.device('cpu')
    )
    result = evaluator(mean_patch_features(encoder))
    assert (result.images, result.train_images, evaluator.num_classes) == (24, 40, 4)
    assert result.top1 >= 90
    # the same images with the training labels shuffled: a filelist source
    lines = [line.split() for line in _filelist(train_root)]
    order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([int(y) for _, y in lines])[order]
    shuffled = tmp_path / 'shuffled.txt'
    shuffled.write_text(''.join(f'{p} {int(y)}\n' for (p, _), y in zip(lines, labels)))
    bad = KnnEvaluator(
        KnnConfig(batch_size=16),
        DataConfig(source='filelist', ann_file=str(shuffled), pipeline='torch', num_workers=0),
        folder_cfg(val_root),
        32,
        0,
        1,
        torch.device('cpu'),
    )
    assert bad(mean_patch_features(encoder)).top1 <= 50  # chance is 25


def _filelist(root):
    return [f'{p} {c}' for c in range(4) for p in sorted((root / f'class_{c}').iterdir())]


def test_monitor_logs_every_n_steps_and_restores_training_mode(folders, tmp_path):
    train_root, val_root = folders
    model = CMAE(CFG).train()
    monitor = KnnMonitor(
        KnnMonitorConfig(every_steps=3, batch_size=16),
        folder_cfg(train_root),
        folder_cfg(val_root),
        32,
        run_dir=tmp_path,
    )
    engine = type('Engine', (), {'device': torch.device('cpu')})()
    results = [monitor(step, engine, model) for step in range(7)]
    monitor.close()
    assert [s for s, r in enumerate(results) if r is not None] == [3, 6]  # not at the start unless asked
    assert model.encoder.training
    lines = [json.loads(x) for x in (tmp_path / 'knn.jsonl').read_text().splitlines()]
    assert [x['step'] for x in lines] == [3, 6] and lines[0]['images'] == 24
    assert list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))


@pytest.mark.slow
def test_monitor_inside_real_pretraining(folders, tmp_path):
    """Wired the way users turn it on: knn.* and knn_train/knn_val overrides of launch/pretrain.py."""
    train_root, val_root = folders
    ds = write_ds(tmp_path)
    run = tmp_path / 'run'
    knn = ['knn.every_steps=2', 'knn.batch_size=8']
    for split, root in (('knn_train', train_root), ('knn_val', val_root)):
        knn += [f'{split}.source=folder', f'{split}.root={root}', f'{split}.pipeline=torch', f'{split}.num_workers=0']
    proc = run_python(
        [
            'launch/pretrain.py',
            '--deepspeed_config',
            ds,
            *TINY,
            *knn,
            'data.source=folder',
            f'data.root={train_root}',
            'data.pipeline=torch',
            'data.num_workers=0',
            'train.epochs=1',
            'train.warmup_epochs=0',
            f'train.output_dir={run}',
        ]
    )
    assert proc.returncode == 0, tail(proc)
    history = [json.loads(x) for x in (run / 'knn.jsonl').read_text().splitlines()]
    assert [h['step'] for h in history] == [2, 4, 6, 8, 10]  # 40 images / batch 4 = 10 steps
    assert all(h['images'] == 24 and h['top1'] > 50 for h in history)
