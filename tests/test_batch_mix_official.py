"""Fine-tuning mixes its batches as the official code does: the project's real criterion (finetune.build_criterion
with the finetune_vit_base preset: mixup 0.8, CutMix 1.0, one of them on every batch, smoothing 0.1) against outputs
the OFFICIAL code made (tests/fixtures/batch_mix_official/make_fixture.py: its fine-tuning config's `Augments` of
BatchMixup and BatchCutMix, and its head's LabelSmoothLoss) from the same inputs and the same seeds of python's,
numpy's and torch's streams: the same mixed images bit for bit, the same smoothed soft targets and loss. An odd batch
(7) on purpose: the official partners are any permutation; timm's mirror pairs needed an even one."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cmae_ds.config.loading import load_task_config
from cmae_ds.tasks import finetune

FIXTURE = Path(__file__).resolve().parent / 'fixtures' / 'batch_mix_official' / 'batch_mix_official.safetensors'
PRESET = Path(finetune.__file__).resolve().parents[1] / 'presets' / 'finetune_vit_base.yaml'
EPS, CLASSES = 0.1, 4


@pytest.fixture(scope='module')
def fx():
    with safe_open(str(FIXTURE), 'pt') as f:
        kinds = f.metadata()['kinds'].split(',')
    return load_file(FIXTURE), kinds


def test_mixes_and_smooths_as_the_official_code(fx):
    tensors, kinds = fx
    cfg = load_task_config('finetune', str(PRESET), [f'finetune.num_classes={CLASSES}', 'finetune.pretrained=none'])
    mix, criterion = finetune.build_criterion(cfg)
    assert {'mixup', 'cutmix'} <= set(kinds)
    for s, kind in enumerate(kinds):
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        img, soft = mix(tensors['img'].clone(), tensors['label'].clone())
        assert torch.equal(img, tensors[f'img_{s}']), (s, kind)
        torch.testing.assert_close(soft, tensors[f'soft_{s}'] * (1 - EPS) + EPS / CLASSES, rtol=0, atol=1e-7)
        loss = criterion(tensors['logits'], soft)
        torch.testing.assert_close(loss.reshape(1), tensors[f'loss_{s}'], rtol=1e-6, atol=0)
