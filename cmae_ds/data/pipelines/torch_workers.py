"""The PyTorch pipeline: PIL decode + the views of views_torch in DataLoader workers; normalization on the device.

Unreadable files are skipped: the sample is replaced by the next readable image of the dataset (so batches keep
their size, which the all-gather of the contrastive loss needs), counted in `loader.bad_files`, and named in a
warning once.
"""

from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ShardError
from ..sources.shards import record_file
from ..views import pil as V
from ..views import recipe as C
from ..views.draws import draw_views, rrc_box
from ..views.erasing import batch_generator, random_erasing
from ..views.normalize import normalize
from ..views.upload import upload
from .base import EpochLoader
from .sampling import ShardPlan, sample_rng

MAX_SUBSTITUTES = 64


class ViewDataset(Dataset):
    """Map-style dataset indexed by (index, epoch) tuples from the loader's batch sampler.

    mode: 'pretrain' -> img, img_target uint8 (3, S, S); 'cls_train' / 'cls_probe' / 'cls_eval' -> img uint8 (3, S, S),
    label.
    """

    def __init__(self, samples, mode: str, img_size: int, master_extra: int, seed: int, debug: bool = False):
        self.samples, self.mode, self.size, self.extra = samples, mode, img_size, master_extra
        self.seed, self.debug = seed, debug

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> dict:
        index, epoch = key
        i, img, bad = self.first_readable(index)
        out = self._transform(img, epoch, index)
        out.update(index=index, source=i, label=self.samples[i][1], bad=bad)  # the label of the image read
        return out

    def first_readable(self, index: int, start: int = 0, load=None) -> tuple[int, object, list[str]]:
        """(dataset index, loaded image, messages for the unreadable files passed) of the first file from
        index + start on that `load(i)` (default: self.load) reads. A damaged shard is no unreadable file: it stops."""
        load, bad = load or self.load, []
        for k in range(start, start + MAX_SUBSTITUTES):
            i = (index + k) % len(self.samples)
            try:
                return i, load(i), bad
            except ShardError:
                raise
            except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable file"
                bad.append(f'{self.samples[i][0]} ({type(e).__name__}: {e})')
        raise RuntimeError(f'{MAX_SUBSTITUTES} unreadable files in a row from {self.samples[index][0]}: {bad[:3]}')

    def decode(self, i: int):
        """Sample i as an RGB PIL image, from its file or its shard."""
        return V.decode_rgb(record_file(self.samples, i))

    load = decode

    def _transform(self, img, epoch: int, index: int) -> dict:
        if self.mode == 'pretrain':
            d = draw_views(self.seed, epoch, index, self.extra)
            online, target = V.cmae_views(img, d, self.size, self.extra)
            out = dict(img=online, img_target=target)
            if self.debug:
                out['debug'] = dict(d.debug(), box=rrc_box(d, img.width, img.height))
            return out
        if self.mode in ('cls_train', 'cls_probe'):
            d = draw_views(self.seed, epoch, index, self.extra, scale=C.CLS_SCALE)
            if self.mode == 'cls_probe':
                return dict(img=V.probe_view(img, d, self.size))
            return dict(img=V.train_view(img, d, sample_rng(self.seed, epoch, index), self.size))
        return dict(img=V.eval_view(img, self.size))


def collate(items: list[dict]) -> dict:
    out = {k: torch.stack([it[k] for it in items]) for k in ('img', 'img_target') if k in items[0]}
    out['index'] = torch.tensor([it['index'] for it in items], dtype=torch.int64)
    out['label'] = torch.tensor([it['label'] for it in items], dtype=torch.int64)
    out['bad'] = [b for it in items for b in it['bad']]
    if 'debug' in items[0]:
        out['debug'] = {k: torch.tensor([it['debug'][k] for it in items]) for k in C.DEBUG_KEYS}
    return out


class TorchLoader(EpochLoader):
    """DataLoader over this rank's ShardPlan batches; batches are moved to `device` and normalized there."""

    name = 'torch'
    collate = staticmethod(collate)
    pin_memory = True

    def __init__(self, dataset: ViewDataset, plan: ShardPlan, device, num_workers: int, erase: bool = False):
        super().__init__(plan, device)
        self.dataset, self.num_workers, self.erase = dataset, num_workers, erase
        self.bad_files: list[str] = []
        self._bad_paths: set[str] = set()

    def _iterate(self, epoch: int, start_batch: int) -> Iterator[dict]:
        for raw in self._raw(epoch, start_batch):
            yield self._finish(*raw)

    def _raw(self, epoch: int, start_batch: int) -> Iterator[tuple]:
        """(collated batch, valid flags, epoch, batch number) as the DataLoader's workers deliver them."""
        batches = self.plan.batches(epoch, start_batch)
        keys = [[(int(i), epoch) for i in idx] for idx, _ in batches]
        dl = DataLoader(
            self.dataset,
            batch_sampler=keys,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            pin_memory=self.pin_memory and self.device.type == 'cuda',
            prefetch_factor=4 if self.num_workers else None,
        )
        for b, (raw, (_, valid)) in enumerate(zip(dl, batches), start_batch):
            yield raw, valid, epoch, b

    def _finish(self, raw: dict, valid: np.ndarray, epoch: int, b: int) -> dict:
        self._report_bad(raw.pop('bad'))
        nb = self.device.type == 'cuda'
        out = {k: normalize(raw[k].to(self.device, non_blocking=nb)) for k in ('img', 'img_target') if k in raw}
        return self._complete(out, raw, valid, epoch, b)

    def _report_bad(self, messages: list[str]) -> None:
        """Each file once, however many decoders failed on it ('path (reason)' messages)."""
        for msg in messages:
            path = msg.split(' (')[0]
            if path not in self._bad_paths:
                self._bad_paths.add(path)
                self.bad_files.append(msg)
                warnings.warn(f'{self.name} data pipeline: skipped unreadable file {msg}', stacklevel=4)

    def _complete(self, out: dict, raw: dict, valid: np.ndarray, epoch: int, b: int) -> dict:
        """Erasing, index, labels, valid flags and debug decisions around the normalized views in `out`."""
        if self.erase:
            random_erasing(out['img'], batch_generator(self.plan.seed, epoch, self.plan.rank, b))
        out['index'] = upload(raw['index'], self.device)
        if self.dataset.mode != 'pretrain':
            out['label'] = upload(raw['label'], self.device)
            out['valid'] = upload(valid.copy(), self.device)
        if 'debug' in raw:
            out['debug'] = raw['debug']
        return out

    @property
    def num_bad_files(self) -> int:
        return len(self.bad_files)
