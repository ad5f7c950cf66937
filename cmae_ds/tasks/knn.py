"""Weighted k-nearest-neighbour classification of frozen features (DINO's eval_knn.py): L2-normalized features,
cosine similarity to every training image, the k most similar vote for their class with weight
exp(similarity / temperature). k = 20, temperature = 0.07.

Features are the mean of the patch tokens (cls excluded) after the encoder's final norm: for CMAE the online
encoder, `model.encoder`. Every rank extracts its shard of both sets; the training bank is gathered to every rank
(memory: N_train x D x 4 bytes per rank, 3.9 GB for ImageNet-1k at D = 768; use a subset as a monitor), and each
rank classifies its own validation shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from ..config import ConfigError, DataConfig, KnnConfig, KnnMonitorConfig
from ..data import build_classification_loader, list_samples
from .evaluate import check_labels


@dataclass
class KnnResult:
    top1: float
    top5: float
    images: int
    train_images: int

    def as_dict(self) -> dict:
        return dict(top1=self.top1, top5=self.top5, images=self.images, train_images=self.train_images)


def mean_patch_features(encoder: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """img (N, 3, S, S) -> (N, D) fp32: mean of the patch tokens of the encoder's output (cls excluded)."""

    def forward(img: torch.Tensor) -> torch.Tensor:
        dtype = next(encoder.parameters()).dtype
        return encoder(img.to(dtype))[:, 1:].mean(dim=1).float()

    return forward


@torch.no_grad()
def extract(forward: Callable, batches: Iterable[dict], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (features (n, D) fp32 L2-normalized, labels (n,)) over valid samples only (padding dropped)."""
    feats, labels = [], []
    for batch in batches:
        valid = batch.get('valid', torch.ones_like(batch['label'], dtype=torch.bool)).to(device)
        feats.append(F.normalize(forward(batch['img'].to(device)), dim=1)[valid])
        labels.append(batch['label'].to(device)[valid])
    return torch.cat(feats), torch.cat(labels)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a (n_r, ...) tensor of every rank (n_r may differ) on every rank."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return t
    world = torch.distributed.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 256,
) -> torch.Tensor:
    """Class scores (n, C) of `feats` (n, D) by weighted vote of their k most similar rows of `train_feats`
    (N, D); all features L2-normalized, so the dot product is the cosine similarity."""
    k = min(k, train_feats.shape[0])
    scores = []
    for start in range(0, feats.shape[0], chunk):
        sim = feats[start : start + chunk] @ train_feats.T  # (b, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (b, k)
        votes = torch.zeros(sim.shape[0], num_classes, device=feats.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes, device=feats.device)


def knn_accuracy(train: tuple, val: tuple, num_classes: int, k: int = 20, temperature: float = 0.07) -> KnnResult:
    """train: (features, labels) gathered from all ranks; val: this rank's (features, labels). Collective."""
    (train_feats, train_labels), (feats, labels) = train, val
    scores = knn_predict(train_feats, train_labels, feats, num_classes, k, temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices
    hit = top.eq(labels[:, None])
    totals = torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(labels.shape[0], device=labels.device)])
    totals = totals.double()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(totals)
    c1, c5, n = totals.tolist()
    return KnnResult(100 * c1 / max(n, 1), 100 * c5 / max(n, 1), int(n), int(train_feats.shape[0]))


class KnnEvaluator:
    """Builds the two evaluation loaders once (eval transforms, no shuffling, padding flagged) and scores any
    feature function on them. Collective: every rank calls it."""

    def __init__(
        self,
        knn: KnnConfig,
        train_data: DataConfig,
        val_data: DataConfig,
        img_size: int,
        rank: int,
        world_size: int,
        device: torch.device,
    ):
        self.knn, self.device = knn, torch.device(device)
        train_samples, val_samples = list_samples(train_data), list_samples(val_data)
        self.num_classes = knn.num_classes or 1 + max((label for _, label in train_samples), default=-1)
        check_labels(train_samples, self.num_classes, 'knn training data')
        check_labels(val_samples, self.num_classes, 'knn validation data')
        common = dict(
            img_size=img_size,
            batch_size=knn.batch_size,
            rank=rank,
            world_size=world_size,
            device=self.device,
            drop_last=False,
        )
        self.train_loader = build_classification_loader(train_data, train=False, samples=train_samples, **common)
        self.val_loader = build_classification_loader(val_data, train=False, samples=val_samples, **common)

    def __call__(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> KnnResult:
        """forward: img (N, 3, S, S) -> features (N, D)."""
        for loader in (self.train_loader, self.val_loader):
            loader.set_epoch(0)
        train_feats, train_labels = extract(forward, self.train_loader, self.device)
        train = (gather_rows(train_feats), gather_rows(train_labels))
        val = extract(forward, self.val_loader, self.device)
        return knn_accuracy(train, val, self.num_classes, self.knn.k, self.knn.temperature)


class KnnMonitor:
    """Pretraining observer (`cmae_ds.tasks.pretrain.train(..., observer=KnnMonitor(...))`): every
    `knn.every_steps` optimizer steps, kNN top-1/top-5 of the online encoder's mean-pooled patch features, logged
    to TensorBoard as knn/top1, knn/top5 in <run_dir>/tensorboard and appended to <run_dir>/knn.jsonl (rank 0;
    nothing is written without run_dir). Collective: the observer runs on every rank. The loaders are built at the
    first evaluation; `at_start` also evaluates at the step the run starts (or resumes) from when it is a multiple of
    every_steps."""

    def __init__(
        self,
        knn: KnnMonitorConfig,
        train_data: DataConfig,
        val_data: DataConfig,
        img_size: int,
        run_dir: Optional[Path] = None,
        at_start: bool = False,
    ):
        if knn.every_steps <= 0:
            raise ConfigError(f'knn.every_steps {knn.every_steps}: the monitor needs a positive interval')
        self.knn, self.train_data, self.val_data, self.img_size = knn, train_data, val_data, img_size
        self.run_dir, self.at_start = Path(run_dir) if run_dir else None, at_start
        self.evaluator: Optional[KnnEvaluator] = None
        self.writer = None
        self.history: list[tuple[int, KnnResult]] = []
        self._first = True

    def __call__(self, step: int, engine, model) -> Optional[KnnResult]:
        first, self._first = self._first, False
        if step % self.knn.every_steps or (first and not self.at_start):
            return None
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if self.evaluator is None:
            self.evaluator = KnnEvaluator(
                self.knn, self.train_data, self.val_data, self.img_size, rank, world, engine.device
            )
        encoder = model.encoder
        was_training = encoder.training
        encoder.eval()  # no drop path
        try:
            result = self.evaluator(mean_patch_features(encoder))
        finally:
            encoder.train(was_training)
        self.history.append((step, result))
        if rank == 0:
            self._log(step, result)
        return result

    def _log(self, step: int, result: KnnResult) -> None:
        if self.run_dir is None:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / 'tensorboard'))
        self.writer.add_scalar('knn/top1', result.top1, step)
        self.writer.add_scalar('knn/top5', result.top5, step)
        self.writer.flush()
        with open(self.run_dir / 'knn.jsonl', 'a') as f:
            f.write(json.dumps({'step': step, **result.as_dict()}) + '\n')

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
