"""Where a CPU training step and a CPU view spend their time, one suspect at a time (docs/benchmarks.md, "Side by
side with the official code"). Not a test: a measurement that prints JSON.

    PYTHONPATH=. python tests/measure_cpu_step.py step     # AdamW backends, EMA forms, attention backends (bf16)
    PYTHONPATH=. python tests/measure_cpu_step.py views    # one image's views, step by step, one thread

`step`: CMAE ViT-B/16's parameter groups with random gradients, each op alone, best of N after a warm-up, 2 threads;
attention forward + backward under bf16 autocast at the online encoder's (8x12x70x64) and the full sequence's
(8x12x197x64) shapes, backends interleaved round by round so that background load hits them alike (median).
`views`: ImageNet-size JPEGs made here, every step of views_torch timed on its own over 3 draws per image.
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def best_ms(fn, n: int = 4) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(min(times) * 1000, 1)


def attention_ms(rounds: int = 12) -> dict:
    from cmae_ds.kernels.attention import BACKENDS

    names, out = ('math', 'sdpa'), {}
    for length in (70, 197):
        q, k, v = [torch.randn(8, 12, length, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        times = {n: [] for n in names}
        for r in range(rounds):
            for name in names[r % 2 :] + names[: r % 2]:
                t = time.perf_counter()
                with torch.autocast('cpu', dtype=torch.bfloat16):
                    y = BACKENDS[name][0](q, k, v)
                y.float().sum().backward()
                if r >= 2:
                    times[name].append(time.perf_counter() - t)
        out.update(
            {f'attention L={length} {n} fwd+bwd ms': round(statistics.median(times[n]) * 1000, 1) for n in names}
        )
    return out


def step_suspects() -> dict:
    from cmae_ds.config import ModelConfig
    from cmae_ds.engine.optim import build_optimizer, param_groups
    from cmae_ds.models import CMAE

    torch.set_num_threads(2)
    out = attention_ms()
    torch.manual_seed(0)
    model = CMAE(ModelConfig(size='vit_base')).train()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    for backend in ('torch_fused', 'torch', 'torch_foreach'):
        opt, _ = build_optimizer(
            param_groups(model, 0.05),
            lr=1e-4,
            betas=(0.9, 0.95),
            backend=backend,
            device=torch.device('cpu'),
            offload=False,
        )
        out[f'adamw {backend} ms'] = best_ms(opt.step)
        del opt
    out['ema foreach ms'] = best_ms(lambda: model.momentum_update(0.996))
    model.enable_flat_ema()
    out['ema flat ms'] = best_ms(lambda: model.momentum_update(0.996))
    return out


def view_steps(images: int = 64) -> dict:
    import torchvision.transforms.functional as tvF
    from PIL import Image, ImageFilter

    from cmae_ds.data.tools.bench import write_imagenet_like
    from cmae_ds.data.views import pil as V
    from cmae_ds.data.views.draws import draw_views, rrc_box

    torch.set_num_threads(1)
    spent: dict = {}

    def timed(name, fn, *args):
        t = time.perf_counter()
        result = fn(*args)
        spent.setdefault(name, []).append(time.perf_counter() - t)
        return result

    with tempfile.TemporaryDirectory() as tmp:
        write_imagenet_like(Path(tmp), images)
        files = sorted(Path(tmp).rglob('*.jpg'))
        for epoch in range(3):
            for i, f in enumerate(files):
                d = draw_views(0, epoch, i, 32)
                with Image.open(f) as im:
                    timed('decode', im.load)
                    img = timed('convert', im.convert, 'RGB')
                master = timed('resize_crop', V.resized_crop, img, rrc_box(d, img.width, img.height), 256)
                if d.flip:
                    master = timed('flip', master.transpose, Image.FLIP_LEFT_RIGHT)
                online = timed('crop', master.crop, (0, 0, 224, 224))
                target = timed('crop', master.crop, (d.dx, d.dy, d.dx + 224, d.dy + 224))
                if d.jitter:
                    target = timed('jitter', V._jitter, target, d.factors, d.order)
                if d.gray:
                    target = timed('gray', tvF.rgb_to_grayscale, target, 3)
                if d.blur:
                    target = timed('blur', target.filter, ImageFilter.GaussianBlur(radius=d.sigma))
                timed('to_tensor', V.to_uint8_chw, online)
                timed('to_tensor', V.to_uint8_chw, target)
    n, total = 3 * len(files), sum(sum(v) for v in spent.values())
    out = {
        k: {'ms_per_image': round(1000 * sum(v) / n, 2), 'share': round(sum(v) / total, 3)} for k, v in spent.items()
    }
    out['total_ms_per_image'] = round(1000 * total / n, 2)
    return out


if __name__ == '__main__':
    what = sys.argv[1] if len(sys.argv) > 1 else 'step'
    print(json.dumps(step_suspects() if what == 'step' else view_steps(), indent=1))
