"""DALI loaders: one pipeline per (epoch, start batch) over this rank's files in ShardPlan order.

Building a pipeline per epoch is what makes `set_epoch` and `skip_batches` exact: the file order is fixed in Python,
and DALI's own shuffling and shard rotation are not used. The pretraining graph's draws come from draws.py, keyed
by (seed, epoch, index) as in the torch pipeline, so a mid-epoch resume repeats the uninterrupted run's views
exactly; the classification training graphs take their crop and flip the same way. Only DALI's RandAugment
(fine-tuning) draws from DALI's generator, seeded from (seed, epoch, rank, start batch): the same seed and epoch
give the same batches, but a mid-epoch resume redraws its operations.
"""

from __future__ import annotations

import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Iterator

import numpy as np
import torch

from ...seeds import dali_pipeline_seed
from ..errors import DataFileError, ShardError
from ..sources.shards import ShardSamples, record_bytes
from ..views import recipe as C
from ..views.draws import cls_columns, dali_columns, draw_batch
from ..views.erasing import batch_generator, random_erasing
from ..views.upload import upload
from .base import EpochLoader
from .sampling import ShardPlan


def _graph_for(mode: str, size: int, extra: int, device: str, hw: float, debug: bool):
    from ..views import dali_graphs as G  # imports nvidia.dali: only when a DALI loader is built

    # The random graphs take the external source of each epoch's draws (feed=) from the loader.
    if mode == 'pretrain':
        return partial(G.cmae_views, size=size, extra=extra, device=device, hw_decoder_load=hw, debug=debug)
    if mode == 'cls_train':
        return partial(G.cls_train_view, size=size, device=device, hw_decoder_load=hw)
    if mode == 'cls_probe':
        return partial(G.cls_probe_view, size=size, device=device, hw_decoder_load=hw)
    return partial(G.cls_eval_view, size=size, device=device, hw_decoder_load=hw)


class DrawFeed:
    """External-source callback of the pretraining and classification training graphs: iteration i -> the draws
    (draws.py) of batch i's samples, one array per entry of draws.DALI_COLUMNS (or CLS_COLUMNS). Keyed by (seed,
    epoch, index) like the torch pipeline's, so where a pipeline starts in the epoch changes nothing. The last batch
    is padded as the reader pads it (repeating the last sample), and the iterations DALI prefetches past the end
    repeat the last batch (their output is dropped)."""

    def __init__(self, indices: list[int], batch_size: int, seed: int, epoch: int, extra: int, mode: str = 'pretrain'):
        self.indices, self.batch_size, self.seed, self.epoch, self.extra = indices, batch_size, seed, epoch, extra
        self.cls = mode != 'pretrain'

    def __call__(self, info) -> tuple:
        b = self.batch_size
        i = min(info.iteration, (len(self.indices) - 1) // b)
        idx = self.indices[i * b : (i + 1) * b]
        idx = idx + [idx[-1]] * (b - len(idx))
        if self.cls:
            return cls_columns(draw_batch(self.seed, self.epoch, idx, self.extra, scale=C.CLS_SCALE))
        return dali_columns(draw_batch(self.seed, self.epoch, idx, self.extra))


class RecordFeed:
    """External source of the shard graph: iteration i -> (image bytes, dataset index) of batch i's samples, read by
    index (pread) in `threads` threads. Padded, and repeated past the end, like DrawFeed.

    The reads run ahead of DALI: when batch i is asked for, batches i+1..i+depth are already being read in the
    pool, so the training thread that drives DALI's non-parallel external source only hands over bytes that are
    there. A ShardError of a read (the file system's, never an image's) is kept in `error` for the loader to raise
    as it is."""

    def __init__(self, samples: ShardSamples, indices: list[int], batch_size: int, threads: int, depth: int = 3):
        self.samples, self.indices, self.batch_size, self.depth = samples, indices, batch_size, depth
        self.pool = ThreadPoolExecutor(max(1, threads))
        self.last = (len(indices) - 1) // batch_size
        self.ahead: dict[int, list] = {}
        self.error: Exception | None = None

    def _batch(self, i: int) -> list[int]:
        b = self.batch_size
        idx = self.indices[i * b : (i + 1) * b]
        return idx + [idx[-1]] * (b - len(idx))

    def _read(self, k: int) -> np.ndarray:
        return np.frombuffer(self.samples.read(k), dtype=np.uint8)

    def _submit(self, i: int) -> None:
        if i <= self.last and i not in self.ahead:
            self.ahead[i] = [self.pool.submit(self._read, k) for k in self._batch(i)]

    def __call__(self, info) -> tuple:
        i = min(info.iteration, self.last)
        for j in range(i, i + self.depth + 1):
            self._submit(j)
        futures = self.ahead.pop(i) if i < self.last else self.ahead[i]  # the last one is repeated past the end
        try:
            data = [f.result() for f in futures]
        except ShardError as e:
            self.error = e
            raise
        return data, [np.array([k], dtype=np.int32) for k in self._batch(i)]

    def close(self) -> None:
        for futures in self.ahead.values():
            for f in futures:
                f.cancel()
        self.pool.shutdown(wait=True)


class DaliLoader(EpochLoader):
    """Contract of build_pretrain_loader / build_classification_loader on a DALI pipeline."""

    def __init__(
        self,
        samples,
        mode: str,
        plan: ShardPlan,
        device,
        img_size: int,
        master_extra: int,
        num_threads: int,
        hw_decoder_load: float = 0.65,
        debug: bool = False,
        erase: bool = False,
    ):
        super().__init__(plan, device)
        self.samples, self.mode, self.debug, self.erase, self.extra = samples, mode, debug, erase, master_extra
        self.paths = [p for p, _ in samples]
        shards = isinstance(samples, ShardSamples)  # its labels without a name string per sample
        self.labels = torch.as_tensor(samples.labels if shards else [lab for _, lab in samples], dtype=torch.int64)
        self.dali_device = 'gpu' if self.device.type == 'cuda' else 'cpu'
        self.name = f'dali-{self.dali_device}'
        self.num_threads = max(1, num_threads)
        self._graph = _graph_for(mode, img_size, master_extra, self.dali_device, hw_decoder_load, debug)
        self.output_map = (
            ['img', 'img_target', 'index'] + (list(C.DEBUG_KEYS) if debug else [])
            if mode == 'pretrain'
            else ['img', 'index']
        )

    def _build(self, files: list[str], indices: list[int], seed: int, feed=None):
        from nvidia.dali import pipeline_def

        @pipeline_def(enable_conditionals=True)
        def graph():
            return self._graph(files, indices, feed) if feed is not None else self._graph(files, indices)

        device_id = (self.device.index or 0) if self.dali_device == 'gpu' else None
        with warnings.catch_warnings():  # DALI 2.x's own auto_aug module still calls deprecated aliases
            warnings.filterwarnings('ignore', message='.*is now deprecated', category=DeprecationWarning)
            pipe = graph(
                batch_size=self.plan.batch_size,
                num_threads=self.num_threads,
                device_id=device_id,
                seed=seed,
                prefetch_queue_depth=2,
            )
            pipe.build()
        return pipe

    def _iterate(self, epoch: int, start_batch: int) -> Iterator[dict]:
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        from ..views.dali_graphs import READER

        batches = self.plan.batches(epoch, start_batch)
        if not batches:
            return
        indices = [int(i) for idx, _ in batches for i in idx]
        shards = isinstance(self.samples, ShardSamples)
        files = (
            RecordFeed(self.samples, indices, self.plan.batch_size, self.num_threads)
            if shards
            else [self.paths[i] for i in indices]
        )
        feed = (
            DrawFeed(indices, self.plan.batch_size, self.plan.seed, epoch, self.extra, self.mode)
            if self.mode != 'cls_eval'
            else None
        )
        pipe = self._build(files, indices, dali_pipeline_seed(self.plan.seed, epoch, self.plan.rank, start_batch), feed)
        # The shard feed is no reader DALI can ask for the epoch size: it is given, with the padding the feed adds.
        size = dict(size=len(indices), last_batch_padded=True) if shards else dict(reader_name=READER)
        with warnings.catch_warnings():  # its advice to name a reader, which the feed is not
            warnings.filterwarnings('ignore', message='Please set `reader_name`')
            it = DALIGenericIterator(
                pipe,
                self.output_map,
                **size,
                auto_reset=False,
                last_batch_policy=LastBatchPolicy.PARTIAL,
                prepare_first_batch=False,
            )
        try:
            for b, (_, valid) in enumerate(batches, start_batch):
                try:
                    raw = next(it)[0]
                except StopIteration:
                    break
                except Exception as e:  # noqa: BLE001 - DALI raises plain RuntimeError; name the file instead
                    if shards and files.error is not None:  # the file system, not an image: no decode error
                        raise files.error from None
                    raise self._file_error(e, batches[b - start_batch : b - start_batch + 3]) from e
                yield self._finish(raw, valid, epoch, b)
        finally:
            del it, pipe
            if shards:
                files.close()

    def _finish(self, raw: dict, valid: np.ndarray, epoch: int, b: int) -> dict:
        index = raw['index'].reshape(-1).to(torch.int64)
        out = {'img': raw['img'].to(self.device)}
        if self.mode == 'pretrain':
            out['img_target'] = raw['img_target'].to(self.device)
        elif self.erase:
            random_erasing(out['img'], batch_generator(self.plan.seed, epoch, self.plan.rank, b))
        # The index comes out of the CPU stage (the shard feed's, or the reader's labels): pinned, not a blocking copy.
        out['index'] = upload(index, self.device)
        if self.mode != 'pretrain':
            out['label'] = upload(self.labels[index.cpu()], self.device)
            out['valid'] = upload(valid.copy(), self.device)
        if self.debug and self.mode == 'pretrain':
            out['debug'] = {
                k: raw[k].reshape(len(index), -1).squeeze(1).cpu().to(C.DEBUG_DTYPES[k]) for k in C.DEBUG_KEYS
            }
        return out

    def _file_error(self, err: Exception, near) -> DataFileError:
        """Map a DALI failure to the file(s) that caused it: DALI's message when it names one, else the files of
        the failing batch (and the prefetched ones after it) that PIL cannot decode either."""
        msg = str(err)
        named = [p for p in set(re.findall(r'[\w./\\:-]*[\w-]\.\w+', msg)) if p in self._path_set()]
        if not named:
            named = [self.paths[i] for idx, _ in near for i in idx if self._unreadable(i)]
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip() and 'no longer valid' not in ln]
        first = lines[-1] if lines else type(err).__name__  # DALI puts the decoder's own words last
        names = ', '.join(dict.fromkeys(named)) or 'a file of this batch (could not tell which)'
        return DataFileError(
            f'{self.name} pipeline cannot decode {names}: {first}\n'
            f'Run launch/scan_dataset.py to list every unreadable file and write a clean file list.'
        )

    def _unreadable(self, i: int) -> bool:
        from ..sources.scan import check_bytes

        return check_bytes(record_bytes(self.samples, i)) is not None

    def _path_set(self) -> set:
        if not hasattr(self, '_paths_cache'):
            self._paths_cache = set(self.paths)
        return self._paths_cache
