"""The torch_gpu pipeline: DataLoader workers read file bytes; the training process decodes the JPEGs of a batch in
one torchvision.io.decode_jpeg call on `device` (batched nvJPEG on CUDA, libjpeg-turbo on CPU) and makes the views
with the batched tensor ops of views_gpu, from the shared draws.

What nvJPEG should not get is decoded on the CPU and joined to the batch: the workers decode non-JPEG files (PNG,
...) and JPEGs that are not 3-component (CMYK, grayscale) with PIL, as the torch pipeline does; a JPEG that
decode_jpeg refuses on the device is retried on the CPU (decode_jpeg, then PIL). Unreadable files are skipped like
the torch pipeline skips them: the sample becomes the next readable image of the dataset (its label follows it),
the file is named in a warning once and counted in `loader.bad_files`.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
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


def one_ahead_on_side_stream(batches: Iterator[dict], device: torch.device) -> Iterator[dict]:
    """Batch b + 1 is decoded and built on a side stream before batch b is handed over, so its kernels can run
    beside the model's work on batch b instead of between two steps. The main stream waits for a batch's event
    only when the batch is handed over; record_stream keeps its memory alive until the main stream is done."""
    side, main = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    pending = None
    while True:
        with torch.cuda.stream(side):
            nxt = next(batches, None)
            ready = torch.cuda.Event()
            ready.record(side)
        if pending is not None:
            out, event = pending
            main.wait_event(event)
            for v in out.values():
                if isinstance(v, torch.Tensor) and v.is_cuda:
                    v.record_stream(main)
            yield out
        if nxt is None:
            return
        pending = (nxt, ready)


class GpuLoader(TorchLoader):
    """TorchLoader whose workers read bytes; decode and views run in this process on `device`."""

    collate = staticmethod(collate)
    pin_memory = False  # the decoder reads the bytes from host memory itself

    def __init__(self, dataset: BytesDataset, plan, device, num_workers: int, erase: bool = False):
        super().__init__(dataset, plan, device, num_workers, erase)
        self.name = f'torch_gpu-{self.device.type}'

    def _iterate(self, epoch: int, start_batch: int) -> Iterator[dict]:
        batches = super()._iterate(epoch, start_batch)
        yield from one_ahead_on_side_stream(batches, self.device) if self.device.type == 'cuda' else batches

    def _finish(self, raw: dict, valid: np.ndarray, epoch: int, b: int) -> dict:
        imgs = decode_batch(unpack(raw), self.device)
        bad = raw['bad'] + self._substitute(imgs, raw)
        self._report_bad(bad)
        index = raw['index'].numpy()
        out = self._views(imgs, index, epoch, raw)
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
        return dict(img=normalize(G.train_views(imgs, d, seeds, ds.size)))
