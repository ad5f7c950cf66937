"""Generated labeled JPEG folders for the fine-tuning, evaluation and kNN tests."""

from pathlib import Path

import torch
from PIL import Image

# Well separated mean colours, so that even a random encoder's features cluster by class.
COLORS = [(200, 40, 40), (40, 40, 200), (40, 190, 40), (200, 200, 60)]


def write_class_folder(root: Path, counts: list, seed: int = 0, size=(40, 44)) -> Path:
    """root/class_<c>/img_<i>.jpg with counts[c] noisy images of colour COLORS[c]."""
    gen = torch.Generator().manual_seed(seed)
    for c, n in enumerate(counts):
        d = root / f'class_{c}'
        d.mkdir(parents=True, exist_ok=True)
        base = torch.tensor(COLORS[c], dtype=torch.float32)
        for i in range(n):
            px = (base + 30 * torch.randn(size[0], size[1], 3, generator=gen)).clamp(0, 255).to(torch.uint8)
            Image.fromarray(px.numpy()).save(d / f'img_{i}.jpg', quality=90)
    return root
