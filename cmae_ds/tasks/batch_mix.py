"""Mixup or CutMix on a fine-tuning batch, drawn as the official code draws them, with smoothed soft targets.

The official fine-tuning config (configs/fine-tuning/cmae/*.py) mixes each batch through `Augments` of BatchMixup
(alpha 0.8, prob 0.5) and BatchCutMix (alpha 1.0, prob 0.5) (cmae/models/utils/augment/): one of them is chosen per
batch by a numpy RandomState seeded from python's `random`, lambda is drawn from numpy's Beta, and the partners are
`torch.randperm` of the batch (any permutation: an image may meet itself, and an odd batch is fine); CutMix's box is
timm's square of side sqrt(1 - lambda) placed by numpy's randint, clipped, lambda corrected to the pasted area. The
head's LabelSmoothLoss then smooths the mixed one-hot labels ('original': (1 - e) y + e / K). The draws here are the
same calls on the same global streams, so a seeded batch mixes as the official one does
(tests/test_batch_mix_official.py holds it against the official code's outputs). timm's Mixup, used before, pairs
image i with image N - 1 - i.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F


class BatchMix:
    """`(img (N, C, H, W), target (N,)) -> (mixed img, soft targets (N, num_classes))`; CutMix pastes in place."""

    def __init__(
        self, mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float, smoothing: float, classes: int
    ):
        # The official Augments' list: its probabilities, and Identity for what is left.
        both = mixup_alpha > 0 and cutmix_alpha > 0
        self.kinds, self.probs = [], []
        if mixup_alpha > 0:
            self.kinds.append(('mixup', mixup_alpha))
            self.probs.append(prob * (1 - switch_prob) if both else prob)
        if cutmix_alpha > 0:
            self.kinds.append(('cutmix', cutmix_alpha))
            self.probs.append(prob * switch_prob if both else prob)
        if sum(self.probs) < 1:
            self.kinds.append(('identity', 0.0))
            self.probs.append(1 - sum(self.probs))
        self.smoothing, self.classes = smoothing, classes

    def __call__(self, img: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chooser = np.random.RandomState(random.randint(0, 2**32 - 1))
        kind, alpha = self.kinds[chooser.choice(len(self.kinds), p=self.probs)]
        label = F.one_hot(target, self.classes)
        if kind == 'identity':
            return img, self._smooth(label.float())
        lam = np.random.beta(alpha, alpha)
        index = torch.randperm(img.size(0)).to(img.device, non_blocking=True)
        if kind == 'mixup':
            img = lam * img + (1 - lam) * img[index, :]
        else:
            (y0, y1, x0, x1), lam = _box(img.shape, lam)
            img[:, :, y0:y1, x0:x1] = img[index, :, y0:y1, x0:x1]
        return img, self._smooth(lam * label + (1 - lam) * label[index, :])

    def _smooth(self, soft: torch.Tensor) -> torch.Tensor:
        smooth = soft.float() * (1 - self.smoothing)
        smooth += self.smoothing / self.classes
        return smooth


def _box(shape, lam: float):
    """CutMix's box and the lambda of the area it leaves (BaseCutMixLayer.rand_bbox, correct_lam)."""
    h, w = shape[-2:]
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy, cx = np.random.randint(0, h), np.random.randint(0, w)
    y0, y1 = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h)
    x0, x1 = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
    return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
