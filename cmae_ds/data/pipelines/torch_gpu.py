"""The torch_gpu pipeline: DataLoader workers read file bytes; a producer thread of the training process decodes the
JPEGs of a batch in one torchvision.io.decode_jpeg call on `device` (batched nvJPEG on CUDA, libjpeg-turbo on CPU)
and makes the views with the batched tensor ops of views/batched.py, from the shared draws, one batch ahead of
training and on a CUDA stream of its own (produce_ahead).

What nvJPEG should not get is decoded on the CPU and joined to the batch: the workers decode non-JPEG files (PNG,
...) and JPEGs that are not 3-component (CMYK, grayscale) with PIL, as the torch pipeline does; a JPEG that
decode_jpeg refuses on the device is retried on the CPU (decode_jpeg, then PIL). Unreadable files are skipped like
the torch pipeline skips them: the sample becomes the next readable image of the dataset (its label follows it),
the file is named in a warning once and counted in `loader.bad_files`.
"""

from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils._pytree import tree_leaves
from torch.utils.data import get_worker_info

from ..sources.shards import record_bytes
from ..views import batched as G
from ..views import pil as V
from ..views import recipe as C
from ..views.draws import draw_batch
from ..views.normalize import normalize
from ..views.upload import upload
from .sampling import sample_rng
from .torch_workers import TorchLoader, ViewDataset

_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (DHT, JPG, DAC are not)


def jpeg_components(buf: bytes) -> int:
    """Colour components of a JPEG from its frame header (3 for YCbCr/RGB, 1 grayscale, 4 CMYK); 0 when `buf` is
    not a JPEG or has no frame header before its data ends."""
    if buf[:3] != b'\xff\xd8\xff':
        return 0
    i = 2
    while i + 9 < len(buf):
        if buf[i] != 0xFF:
            return 0
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _SOF:
            return buf[i + 9]
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        else:
            i += 2 + (buf[i + 2] << 8 | buf[i + 3])
    return 0


def read_sample(path: str) -> torch.Tensor:
    return sample_from_bytes(Path(path).read_bytes())


def sample_from_bytes(data: bytes) -> torch.Tensor:
    """Worker side: a 3-component JPEG's bytes as uint8 (n,) for the batched decoder; anything else decoded here
    with PIL -> uint8 (3, H, W). Raises on a file PIL cannot read (the dataset turns that into a skip)."""
    if jpeg_components(data) == 3:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return V.to_uint8_chw(V.decode_rgb(io.BytesIO(data)))


class BytesDataset(ViewDataset):
    """ViewDataset whose items carry the file (bytes or a CPU-decoded image) instead of the views."""

    def load(self, i: int) -> torch.Tensor:
        return sample_from_bytes(record_bytes(self.samples, i))

    def _transform(self, img: torch.Tensor, epoch: int, index: int) -> dict:
        return dict(data=img)


def collate(items: list[dict]) -> dict:
    """Worker side: the batch's files as one uint8 buffer (JPEG bytes, or a CPU-decoded (3, H, W) image flattened)
    with offsets and shapes ((0, 0) for bytes). A tensor crosses to the training process as one shared-memory
    segment, which under torch's default file_descriptor sharing costs a descriptor and a socket connection each:
    a few per batch, not one per image."""
    data = [it['data'] for it in items]
    offsets = torch.zeros(len(data) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor([d.numel() for d in data], dtype=torch.int64).cumsum(0)
    shapes = [tuple(d.shape[1:]) if d.dim() == 3 else (0, 0) for d in data]
    return dict(
        data=_concat(data, int(offsets[-1])),
        offsets=offsets,
        shapes=torch.tensor(shapes, dtype=torch.int64).view(-1, 2),
        index=torch.tensor([it['index'] for it in items], dtype=torch.int64),
        source=torch.tensor([it['source'] for it in items], dtype=torch.int64),
        label=torch.tensor([it['label'] for it in items], dtype=torch.int64),
        bad=[b for it in items for b in it['bad']],
    )


def _concat(data: list[torch.Tensor], total: int) -> torch.Tensor:
    flat = [d.reshape(-1) for d in data]
    out = None
    if get_worker_info() is not None:  # written straight into shared memory, as torch's default_collate does
        out = flat[0].new(flat[0]._typed_storage()._new_shared(total, device='cpu')).resize_(total)
    return torch.cat(flat, out=out)


def unpack(raw: dict) -> list[torch.Tensor]:
    """collate's batch -> each item's 1-D JPEG bytes or uint8 (3, H, W) image, as views of the one buffer."""
    buf, offsets = raw['data'], raw['offsets'].tolist()
    out = []
    for i, (h, w) in enumerate(raw['shapes'].tolist()):
        blob = buf[offsets[i] : offsets[i + 1]]
        out.append(blob.view(3, h, w) if h else blob)
    return out


def _decode_one(blob: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
    """One JPEG the batched call refused: decode_jpeg on the device, then on the CPU, then PIL; None if none can."""
    from torchvision.io import ImageReadMode, decode_jpeg

    for dev in dict.fromkeys([device, torch.device('cpu')]):
        try:
            return upload(decode_jpeg(blob, mode=ImageReadMode.RGB, device=dev), device)
        except RuntimeError:
            pass
    try:
        from PIL import Image

        with Image.open(io.BytesIO(blob.numpy().tobytes())) as im:
            return upload(V.to_uint8_chw(im.convert('RGB')), device)
    except Exception:  # noqa: BLE001 - any decoder failure means "unreadable file"
        return None


def decode_batch(data: list[torch.Tensor], device: torch.device) -> list[Optional[torch.Tensor]]:
    """Worker items -> uint8 (3, H, W) images on `device`: the encoded ones (1-D) in one decode_jpeg call, one at a
    time if that call fails; already decoded ones moved over. None where nothing can decode the file."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out = [upload(d, device) if d.dim() == 3 else None for d in data]
    enc = [i for i, d in enumerate(data) if d.dim() == 1]
    if not enc:
        return out
    blobs = [data[i] for i in enc]
    if device.type == 'cuda':
        # torchvision allocates the decoded images on this stream, but nvJPEG writes them on a private stream that
        # does not wait for this one (decode_jpegs_cuda.cpp; pytorch/vision PR 9606): memory freed here with
        # kernels still queued could be written under them. Those kernels (the previous batch's views) end first.
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():
        # torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they still are the batched
        # nvJPEG path this pipeline exists for.
        warnings.filterwarnings('ignore', message='The image decoding', category=DeprecationWarning)
        try:
            decoded = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = [_decode_one(b, device) for b in blobs]
    for i, img in zip(enc, decoded):
        out[i] = img
    return out


def produce_ahead(items: Iterator[tuple], make: Callable, device: torch.device) -> Iterator:
    """make(*item) for batch b + 1 runs on a producer thread while the caller trains on batch b, so decoding and
    views leave the training thread. On CUDA the producer queues its kernels on a stream of its own and records an
    event per batch; the training stream waits for that event when the batch is handed over (no host wait, no
    synchronize), and record_stream keeps the batch's memory, allocated on the producer's stream, alive until the
    training stream is done with it."""
    cuda = device.type == 'cuda'
    side = torch.cuda.Stream(device) if cuda else None

    def run(item: tuple):
        if not cuda:
            return make(*item), None
        torch.cuda.set_device(device)  # the current device is per thread
        with torch.cuda.stream(side):
            made = make(*item)
            ready = torch.cuda.Event()
            ready.record(side)
        return made, ready

    with ThreadPoolExecutor(1, thread_name_prefix='torch_gpu-views') as pool:
        pending = None
        for item in items:
            queued = pool.submit(run, item)
            if pending is not None:
                yield _hand_over(*pending.result(), device)
            pending = queued
        if pending is not None:
            yield _hand_over(*pending.result(), device)


def _hand_over(made, ready, device: torch.device):
    if ready is None:
        return made
    main = torch.cuda.current_stream(device)
    main.wait_event(ready)
    for t in tree_leaves(made):
        if isinstance(t, torch.Tensor) and t.is_cuda:
            t.record_stream(main)
    return made


class GpuLoader(TorchLoader):
    """TorchLoader whose workers read bytes; decode and views run in this process on `device`."""

    collate = staticmethod(collate)
    pin_memory = False  # the decoder reads the bytes from host memory itself

    def __init__(self, dataset: BytesDataset, plan, device, num_workers: int, erase: bool = False):
        super().__init__(dataset, plan, device, num_workers, erase)
        self.name = f'torch_gpu-{self.device.type}'

    def _iterate(self, epoch: int, start_batch: int) -> Iterator[dict]:
        for made in produce_ahead(self._raw(epoch, start_batch), self._make, self.device):
            yield self._hand_over(*made)

    def _make(self, raw: dict, valid: np.ndarray, epoch: int, b: int) -> tuple:
        """Producer thread: decode, substitutes for unreadable files, views (all but RandAugment)."""
        imgs = decode_batch(unpack(raw), self.device)
        bad = raw['bad'] + self._substitute(imgs, raw)
        out = self._views(imgs, raw['index'].numpy(), epoch, raw)
        return out, bad, raw, valid, epoch, b

    def _hand_over(self, out: dict, bad: list, raw: dict, valid: np.ndarray, epoch: int, b: int) -> dict:
        """Training thread, in batch order. RandAugment runs here: torchvision's draws from the process-global CPU
        generator (rand_augment), which the training thread uses too, so on another thread the two would
        interleave and neither stream would be reproducible."""
        self._report_bad(bad)
        if 'seeds' in out:
            out = dict(img=normalize(G.rand_augment(out['img'], out['seeds'])))
        return self._complete(out, raw, valid, epoch, b)

    def _substitute(self, imgs: list, raw: dict) -> list[str]:
        """Files no decoder could read become the next readable image of the dataset (decoded with PIL here), with
        its label, in place in `imgs` and raw['label']."""
        bad = []
        for n, img in enumerate(imgs):
            if img is not None:
                continue
            source = int(raw['source'][n])  # the file the worker read (the item's own or its substitute)
            i, pil, passed = self.dataset.first_readable(source, start=1, load=self.dataset.decode)
            bad += [f'{self.dataset.samples[source][0]} (decode_jpeg and PIL cannot decode it)'] + passed
            imgs[n] = upload(V.to_uint8_chw(pil), self.device)
            raw['label'][n] = self.dataset.samples[i][1]
        return bad

    def _views(self, imgs: list[torch.Tensor], index: np.ndarray, epoch: int, raw: dict) -> dict:
        ds, seed, extra = self.dataset, self.plan.seed, self.dataset.extra
        if ds.mode == 'pretrain':
            d = draw_batch(seed, epoch, index, extra)
            online, target = G.cmae_views(imgs, d, ds.size, extra)
            if ds.debug:
                raw['debug'] = G.debug_of(d, G.boxes_of(d, imgs))
            return dict(img=online, img_target=target)
        if ds.mode == 'cls_eval':
            return dict(img=normalize(G.eval_views(imgs, ds.size)))
        d = draw_batch(seed, epoch, index, extra, scale=C.CLS_SCALE)
        if ds.mode == 'cls_probe':
            return dict(img=normalize(G.probe_views(imgs, d, ds.size)))
        seeds = [int(sample_rng(seed, epoch, int(i)).integers(2**62)) for i in index]
        return dict(img=G.probe_views(imgs, d, ds.size), seeds=seeds)  # RandAugment: _hand_over
