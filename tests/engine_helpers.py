"""Helpers for tests that run the real DeepSpeed launcher and engine on the CPU (gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / 'deepspeed')
TINY = [
    'model.size=debug',
    'model.img_size=32',
    'model.patch_size=8',
    'model.decoder_depth=1',
    'train.progress_bar=false',
    'train.log_every_steps=1',
    'train.image_every_steps=0',
    'data.source=synthetic',
]


def write_ds(tmp: Path, name: str = 'ds.json', **overrides) -> str:
    ds = {
        'train_micro_batch_size_per_gpu': 4,
        'gradient_accumulation_steps': 1,
        'zero_optimization': {'stage': 0},
        'gradient_clipping': 0.0,
        'steps_per_print': 10**9,
    }
    ds.update(overrides)
    path = tmp / name
    path.write_text(json.dumps(ds))
    return str(path)


def env() -> dict:
    e = dict(os.environ)
    e.setdefault('OMP_NUM_THREADS', '1')
    e['PYTHONUNBUFFERED'] = '1'
    return e


# Generous: on a fresh machine the first DeepSpeed start JIT-compiles its CPU communication op (minutes).
TIMEOUT = 900


def run_deepspeed(
    script_args: list, *, num_gpus: int = 2, timeout: int = TIMEOUT, extra: list = (), port: int | None = None
) -> subprocess.CompletedProcess:
    cmd = [DEEPSPEED, '--num_gpus', str(num_gpus), '--master_port', str(port or free_port()), *extra, *script_args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def run_python(args: list, timeout: int = TIMEOUT, extra_env=None) -> subprocess.CompletedProcess:
    e = env()
    e.update(extra_env or {})
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def tail(proc: subprocess.CompletedProcess, n: int = 6000) -> str:
    # DeepSpeed's ZeRO collectives warn on every call in torch 2.14; keep the end of the output readable
    lines = (proc.stdout + proc.stderr).splitlines()
    noise = [i for i, line in enumerate(lines) if 'FutureWarning' in line]
    drop = set(noise) | {i + 1 for i in noise if i + 1 < len(lines) and 'return func(' in lines[i + 1]}
    return '\n'.join(line for i, line in enumerate(lines) if i not in drop)[-n:]
