"""The augmentation recipe every pipeline implements (docs/spec.md sections 7 and 9), as constants, and the
per-sample decisions a pipeline reports under debug=True."""

from __future__ import annotations

import math

import torch

# docs/spec.md section 7, step 5: normalization on 0-255 values (ImageNet statistics).
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)

# docs/spec.md section 7: master crop and target-view augmentations.
MASTER_SCALE = (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)
JITTER_P, GRAY_P, BLUR_P = 0.8, 0.2, 0.5
BRIGHTNESS = CONTRAST = SATURATION = 0.4
HUE = 0.1
BLUR_SIGMA = (0.1, 2.0)

# docs/spec.md section 9: fine-tuning / evaluation.
CLS_SCALE = (0.08, 1.0)
EVAL_RESIZE_RATIO = 256 / 224
ERASE_P = 0.25

DEBUG_KEYS = ('flip', 'dy', 'dx', 'jitter', 'gray', 'blur', 'sigma', 'box')
"""Per-sample random decisions a pipeline returns under debug=True (tests check their rates); box is the master's
crop (top, left, h, w) in source pixels, (N, 4)."""
DEBUG_DTYPES = dict(
    flip=torch.bool,
    dy=torch.int64,
    dx=torch.int64,
    jitter=torch.bool,
    gray=torch.bool,
    blur=torch.bool,
    sigma=torch.float32,
    box=torch.int64,
)


def eval_resize_size(img_size: int) -> int:
    """Short side before the center crop: 256 for 224, scaled the same way for other sizes."""
    return int(math.floor(img_size * EVAL_RESIZE_RATIO + 0.5))


# docs/spec.md section 9: random erasing aspect ratios in [0.3, 1 / 0.3], uniform in log.
ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))
