"""Fine-tuning in this process on the real DeepSpeed engine (one rank, gloo): it learns an easy task (four colour
classes made here) well above chance within a few dozen CPU steps, and its micro-step's Mixup/CutMix/label-smoothing
loss equals the loss of the official mixing (tasks/batch_mix.py, held against the official code by
test_batch_mix_official.py) built by hand with the official recipe, on the same inputs and the same random draws."""

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cmae_ds.config.ds_config import validate
from cmae_ds.config.loading import load_task_config
from cmae_ds.engine.dist import setup_distributed
from cmae_ds.tasks import finetune
from cmae_ds.tasks.batch_mix import BatchMix

from engine_helpers import write_ds
from finetune_helpers import write_class_folder
from run_recorder import one_rank_group

PRESETS = Path(finetune.__file__).resolve().parents[1] / 'presets'
SMALL = ['model.size=debug', 'model.img_size=32', 'model.patch_size=8', 'finetune.pretrained=none']
SMALL += ['finetune.num_classes=4', 'finetune.seed=1', 'data.num_workers=0', 'val_data.num_workers=0']
SMALL += ['finetune.progress_bar=false']


@pytest.mark.slow
def test_finetuning_learns_an_easy_task_well_above_chance(tmp_path):
    """64 training images in 4 colour classes, 32 held out; 4 epochs of 8 steps from a random encoder with the
    debug preset's recipe (RandAugment, Mixup/CutMix, label smoothing, layer decay). Chance is 25 %."""
    train = write_class_folder(tmp_path / 'train', [16] * 4, seed=1, size=(32, 32))
    val = write_class_folder(tmp_path / 'val', [8] * 4, seed=2, size=(32, 32))
    cfg = load_task_config(
        'finetune',
        str(PRESETS / 'finetune_debug.yaml'),
        SMALL
        + ['finetune.epochs=4', 'finetune.warmup_epochs=1', f'finetune.output_dir={tmp_path / "run"}']
        + [f'data.root={train}', f'val_data.root={val}'],
    )
    with one_rank_group():
        result = finetune.train(cfg, write_ds(tmp_path, train_micro_batch_size_per_gpu=8))
    assert result.steps == 32
    top1 = [r.top1 for _, r in result.evals]
    losses = [r.loss for _, r in result.evals]
    assert len(top1) == 4 and top1[-1] >= 90.0, top1
    assert losses[-1] < losses[0] < math.log(4), losses  # below chance's cross-entropy after one epoch already


def test_the_mixed_loss_of_a_micro_step_equals_the_official_mixings(tmp_path):
    """The official recipe's values (finetune_vit_base: mixup 0.8, cutmix 1.0, prob 1, switch 0.5, smoothing 0.1)
    through finetune.train_step on a real engine, against the official mixing and timm's SoftTargetCrossEntropy made
    here by hand and the classifier's own logits for the mixed images: same inputs, same draws, same loss."""
    cfg = load_task_config(
        'finetune',
        str(PRESETS / 'finetune_vit_base.yaml'),
        SMALL + ['finetune.drop_path=0', f'finetune.output_dir={tmp_path}'],
    )
    ds = {'train_micro_batch_size_per_gpu': 8, 'gradient_accumulation_steps': 1, 'zero_optimization': {'stage': 0}}
    mixup, criterion = finetune.build_criterion(cfg)
    with one_rank_group():
        ctx = setup_distributed()
        engine, model, _ = finetune.build_engine(cfg, ds, validate(ds, None, ctx.world_size, path='ds'), ctx, 1e-3)
        _compare_with_official_mixing(engine, model, mixup, criterion)


def _compare_with_official_mixing(engine, model, mixup, criterion):
    from timm.loss import SoftTargetCrossEntropy

    reference = BatchMix(0.8, 1.0, 1.0, 0.5, 0.1, 4)  # the official values (tests/test_batch_mix_official.py)
    gen = torch.Generator().manual_seed(0)
    for seed in range(6):  # both mixup and cutmix draws among them
        img, label = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        _seed_all(seed)
        mixed, soft = reference(img.clone(), label.clone())  # CutMix pastes in place
        with torch.no_grad():
            want = SoftTargetCrossEntropy()(model(mixed).float(), soft)
        assert soft.sum(1).allclose(torch.ones(8)) and soft.min() >= 0.1 / 4 - 1e-7  # smoothed and mixed
        _seed_all(seed)
        got = finetune.train_step(engine, {'img': img.clone(), 'label': label.clone()}, torch.float32, mixup, criterion)
        assert float(got.detach()) == pytest.approx(float(want), rel=1e-6), seed


def _seed_all(seed: int) -> None:
    """The streams the official mixing draws from: python's (the choice), numpy's (lambda, the box), torch's."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
