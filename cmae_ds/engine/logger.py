"""Rank-0 logging: TensorBoard scalars and images, a progress bar with ETA, reconstruction PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..data import MEAN, STD
from ..models.masking import patchify, unpatchify


class RunLogger:
    """Does nothing on ranks other than 0, so engines can call it unconditionally."""

    def __init__(self, run_dir: Path, total_steps: int, initial_step: int, enabled: bool, progress_bar: bool):
        self.enabled = enabled
        self.run_dir = run_dir
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / 'tensorboard'))
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit='step', dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(f'train/{name}', value, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f'{values.get("loss", float("nan")):.4f}', lr=f'{values.get("lr", 0):.2e}')

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def reconstruction(self, step: int, img, img_target, pred, mask, patch_size: int) -> Optional[Path]:
        """Grid of online view, masked input, reconstruction and target view (first 4 samples) to TB and PNG."""
        if not self.enabled:
            return None
        from torchvision.utils import make_grid, save_image

        rows = reconstruction_rows(img[:4], img_target[:4], pred[:4], mask[:4], patch_size)
        grid = make_grid(torch.cat(rows), nrow=rows[0].shape[0], padding=2)
        self.writer.add_image('train/reconstruction', grid, step)
        path = self.run_dir / 'images' / f'step_{step:08d}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        return path

    def text(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """Normalized image (N, 3, H, W) -> [0, 1]."""
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1) / 255
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1) / 255
    return (x.float().cpu() * std + mean).clamp(0, 1)


@torch.no_grad()
def reconstruction_rows(img, img_target, pred, mask, patch_size: int) -> list[torch.Tensor]:
    """Four (n, 3, H, W) rows in [0, 1]. The prediction is per-patch normalized, so it is mapped back with the
    mean and standard deviation of the original patch before undoing the image normalization."""
    img, pred, mask = img.float().cpu(), pred.float().cpu(), mask.cpu()
    patches = patchify(img, patch_size)
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    recon = unpatchify(pred * (var + 1e-6).sqrt() + mean, patch_size)
    hidden = unpatchify(mask[..., None].float().expand_as(patches), patch_size)
    masked = _to_unit(img) * (1 - hidden) + 0.5 * hidden
    rows = [_to_unit(img), masked, _to_unit(recon)]
    if img_target is not None:
        rows.append(_to_unit(img_target))
    return rows
