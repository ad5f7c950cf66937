"""The two entry points the engines call: build_pretrain_loader and build_classification_loader."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from ...config.sections import CMAE_MASTER_EXTRA
from ..errors import DataSourceError
from ..sources.files import Sample, list_samples
from .base import EpochLoader
from .sampling import ShardPlan
from .threads import data_workers

log = logging.getLogger(__name__)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali.plugin import pytorch  # noqa: F401
    except ImportError:
        return False
    return True


PIPELINES = ('auto', 'dali', 'torch_gpu', 'torch')


def resolve_pipeline(pipeline: str, device: torch.device | str = 'cpu') -> str:
    """'auto' -> 'dali' when nvidia.dali imports, else 'torch_gpu' on a CUDA device, else 'torch'; 'dali' without
    DALI is an error."""
    if pipeline == 'auto':
        if dali_available():
            return 'dali'
        return 'torch_gpu' if torch.device(device).type == 'cuda' else 'torch'
    if pipeline == 'dali' and not dali_available():
        raise ImportError(
            "data.pipeline 'dali' but nvidia.dali (with its PyTorch plugin) does not import; install "
            'the [dali] extra (e.g. pip install nvidia-dali-cuda120) or set data.pipeline=torch_gpu '
            '(GPU decoding without DALI) or torch'
        )
    if pipeline not in PIPELINES:
        raise ValueError(f'data.pipeline {pipeline!r} must be one of {", ".join(PIPELINES)}')
    return pipeline


def _plan(
    samples_len: int,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    shuffle: bool,
    drop_last: bool,
    pad: bool,
    where: str,
) -> ShardPlan:
    plan = ShardPlan(samples_len, batch_size, rank, world_size, seed, shuffle, drop_last, pad)
    if plan.num_batches() == 0:
        raise DataSourceError(
            f'{where}: {samples_len} images give no batch of {batch_size} on each of {world_size} '
            f'rank(s) with drop_last={drop_last}; lower the batch size or add images'
        )
    return plan


def _make(
    mode: str, data_cfg, samples: list[Sample], plan: ShardPlan, img_size: int, device, debug: bool
) -> EpochLoader:
    pipeline = resolve_pipeline(data_cfg.pipeline, device)
    erase = mode == 'cls_train'
    # a Config sets it by the model's mode; a DataConfig on its own makes CMAE's views
    extra = CMAE_MASTER_EXTRA if data_cfg.master_extra is None else data_cfg.master_extra
    workers = data_workers(data_cfg.num_workers, device)
    if pipeline == 'dali':
        from .dali import DaliLoader

        loader = DaliLoader(
            samples,
            mode,
            plan,
            device,
            img_size,
            extra,
            workers,
            data_cfg.hw_decoder_load,
            debug,
            erase,
        )
    elif pipeline == 'torch_gpu':
        from .torch_gpu import BytesDataset, GpuLoader

        ds = BytesDataset(samples, mode, img_size, extra, plan.seed, debug)
        loader = GpuLoader(ds, plan, device, workers, erase)
    else:
        from .torch_workers import TorchLoader, ViewDataset

        ds = ViewDataset(samples, mode, img_size, extra, plan.seed, debug)
        loader = TorchLoader(ds, plan, device, workers, erase)
    log.info('data: %s pipeline, %d images, %r', loader.name, len(samples), loader)
    return loader


def build_pretrain_loader(
    data_cfg,
    img_size: int = 224,
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: torch.device | str = 'cpu',
    drop_last: bool = True,
    *,
    debug: bool = False,
    samples: Optional[list[Sample]] = None,
) -> EpochLoader:
    """Batches of the two CMAE views (docs/spec.md section 7) for this rank.

    Yields dicts: 'img' (online view) and 'img_target' float32 (N, 3, S, S) normalized, on `device`; 'index' (N,)
    int64 dataset indices; with debug=True also 'debug': {flip, dy, dx, jitter, gray, blur, sigma} (N,) CPU tensors.
    samples: (path, label) list overriding data_cfg's source (benchmarks, tests).
    """
    device = torch.device(device)
    if data_cfg.source == 'synthetic':
        from .synthetic import SYNTHETIC_SIZE, SyntheticLoader

        plan = _plan(SYNTHETIC_SIZE, batch_size, rank, world_size, seed, True, drop_last, False, 'synthetic')
        return SyntheticLoader(plan, device, img_size, 'pretrain')
    samples = samples if samples is not None else list_samples(data_cfg)
    plan = _plan(len(samples), batch_size, rank, world_size, seed, True, drop_last, False, f'data.{data_cfg.source}')
    return _make('pretrain', data_cfg, samples, plan, img_size, device, debug)


def build_classification_loader(
    data_cfg,
    train: bool,
    img_size: int = 224,
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: torch.device | str = 'cpu',
    drop_last: Optional[bool] = None,
    *,
    samples: Optional[list[Sample]] = None,
    augment: str = 'finetune',
) -> EpochLoader:
    """Training batches (train=True) or evaluation batches. Training augmentation: augment='finetune'
    (RandomResizedCrop + flip + RandAugment + random erasing) or 'probe' (RandomResizedCrop + flip: MAE's linear
    probe).

    Yields dicts: 'img' float32 (N, 3, S, S) normalized, 'label' (N,) int64, 'index' (N,) int64, 'valid' (N,) bool
    (False for the DistributedSampler-style padding that evaluation adds when len % world_size != 0), on `device`.
    drop_last defaults to `train`; evaluation never drops (and never shuffles).
    """
    device = torch.device(device)
    drop_last = train if drop_last is None else drop_last
    if augment not in ('finetune', 'probe'):
        raise ValueError(f"augment {augment!r} must be 'finetune' or 'probe'")
    mode = ('cls_train' if augment == 'finetune' else 'cls_probe') if train else 'cls_eval'
    if data_cfg.source == 'synthetic':
        from .synthetic import SYNTHETIC_SIZE, SyntheticLoader

        plan = _plan(
            SYNTHETIC_SIZE if train else 50_000,
            batch_size,
            rank,
            world_size,
            seed,
            train,
            drop_last,
            False,
            'synthetic',
        )
        return SyntheticLoader(plan, device, img_size, mode)
    samples = samples if samples is not None else list_samples(data_cfg)
    plan = _plan(
        len(samples), batch_size, rank, world_size, seed, train, drop_last, not drop_last, f'data.{data_cfg.source}'
    )
    return _make(mode, data_cfg, samples, plan, img_size, device, False)
