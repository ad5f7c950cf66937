"""Runs of launch/pretrain.py for the reliability tests, and fault injection around the real save.

`python tests/reliability_helpers.py launch/pretrain.py ARGS...` with CMAE_TEST_FAIL_SAVE=<substring>:<ERRNO name>
runs the launch script unchanged except that torch.save raises that OSError for any path containing the substring
(DeepSpeed's checkpoint engine and the rank files write through torch.save), and so does the write of a model file
(model.safetensors, cmae_ds/modelfiles/model_file.py) to such a path.
"""

from __future__ import annotations

import errno
import json
import os
import runpy
import sys
from pathlib import Path

from engine_helpers import TINY, run_python, write_ds

HERE = Path(__file__).resolve().parent


def pretrain(tmp_path: Path, run_dir: Path, *extra, env=None, inject: str = '', image_root: Path = None):
    """A tiny synthetic pretraining run (one process, real DeepSpeed, ZeRO-0 fp32) writing into `run_dir`."""
    ds = write_ds(tmp_path)
    args = [
        'launch/pretrain.py',
        '--deepspeed_config',
        ds,
        *TINY,
        'data.num_workers=0',
        'train.epochs=100',
        'train.warmup_epochs=1',
        'train.save_every_steps=2',
        'train.keep_last=3',
        f'train.output_dir={run_dir}',
        *extra,
    ]
    if inject:
        env = dict(env or {}, CMAE_TEST_FAIL_SAVE=inject)
        args = [str(HERE / 'reliability_helpers.py'), *args]
    return run_python(args, extra_env=env)


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith('error:')]


def marker(run_dir: Path, tag: str) -> dict:
    return json.loads((run_dir / 'checkpoints' / tag / 'complete.json').read_text())


def _failing(real_save, pattern: str, code: int):
    def save(obj, f, *args, **kwargs):
        if pattern in str(f):
            raise OSError(code, os.strerror(code), str(f))
        return real_save(obj, f, *args, **kwargs)

    return save


def _fail_model_files(pattern: str, code: int) -> None:
    from cmae_ds.modelfiles import model_file

    real = model_file.write_atomically

    def write_atomically(path, write, what='file'):
        def failing(f):
            raise OSError(code, os.strerror(code), str(path))

        return real(path, failing if pattern in str(path) else write, what)

    model_file.write_atomically = write_atomically


if __name__ == '__main__':
    import torch

    pattern, name = os.environ['CMAE_TEST_FAIL_SAVE'].rsplit(':', 1)
    torch.save = _failing(torch.save, pattern, getattr(errno, name))
    _fail_model_files(pattern, getattr(errno, name))
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(Path(sys.argv[0]).resolve().parent))
    runpy.run_path(sys.argv[0], run_name='__main__')
