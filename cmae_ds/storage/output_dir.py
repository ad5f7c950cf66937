"""The run folder as a place to write: a check before anything is built, atomic file writes, and write failures
(full disk, read-only file system, missing permission) turned into one line that names the path, the error and the
free space.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from pathlib import Path
from typing import Callable, Optional

from .atomic_write import atomic_write

# A save needs room for one more checkpoint beside the kept ones; before the first there is nothing to measure.
MIN_FREE_BYTES = 16 << 20
_PROBE_BYTES = 64 << 10


class OutputWriteError(RuntimeError):
    """A file of the run folder could not be written (no space, read-only, permission); the message names the path,
    the error and the free space. Whatever was partly written has been removed."""


def human(n: float) -> str:
    for unit in ('B', 'KiB', 'MiB'):
        if n < 1024:
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1024
    return f'{n:.1f} GiB'


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_space(path: Path) -> str:
    """'1.2 GiB free of 40.0 GiB' on the file system holding `path` (or its nearest existing parent)."""
    try:
        usage = shutil.disk_usage(_existing(path))
    except OSError as e:
        return f'free space unknown ({e.strerror})'
    return f'{human(usage.free)} free of {human(usage.total)}'


def _probe(directory: Path) -> Optional[OSError]:
    """Write, sync and remove a small file in `directory`: the OSError a real write would meet, or None."""
    probe = directory / f'.write_probe.{socket.gethostname()}.{os.getpid()}'
    try:
        with open(probe, 'wb') as f:
            f.write(b'\0' * _PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return None


def is_write_failure(err: BaseException) -> bool:
    """An OSError, or torch's writer reporting a failed write (it hides the errno: '[enforce fail at
    inline_container.cc] unexpected pos', 'PytorchStreamWriter failed writing file')."""
    if isinstance(err, OSError):
        return True
    msg = str(err)
    return isinstance(err, RuntimeError) and any(
        s in msg for s in ('inline_container', 'PytorchStreamWriter', 'file write failed')
    )


def _reason(err: BaseException, directory: Path) -> str:
    if isinstance(err, OSError) and err.errno is not None:
        return f'{err.strerror or os.strerror(err.errno)} [{errno.errorcode.get(err.errno, err.errno)}]'
    # torch lost the errno: a small write to the same folder finds out what the file system says
    probe = _probe(_existing(directory)) if _existing(directory).is_dir() else None
    if probe is not None and probe.errno is not None:
        return f'{probe.strerror} [{errno.errorcode.get(probe.errno, probe.errno)}]'
    return f'{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ""}'.rstrip(': ')


def write_error(what: str, path: Path, err: BaseException) -> OutputWriteError:
    """One line: what could not be written where, the file system's reason, and the free space there."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    return OutputWriteError(
        f'cannot write {what} {path}: {_reason(err, directory)}; {free_space(directory)} on that file system'
    )


def write_atomically(path: Path, write: Callable, what: str = 'file') -> Path:
    """atomic_write (`write(f)` on a temporary file, then renamed over `path`), with a failed write raised as
    OutputWriteError naming the path, the reason and the free space (the old file stays)."""
    return atomic_write(path, write, describe=lambda e: write_error(what, path, e) if is_write_failure(e) else None)


def save_atomically(obj, path: Path, what: str = 'model file') -> Path:
    """torch.save through write_atomically."""
    import torch

    return write_atomically(path, lambda f: torch.save(obj, f), what)


def remove_partial(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def check_output_dir(run_dir: Path, need_bytes: int = MIN_FREE_BYTES, key: str = 'train.output_dir') -> None:
    """Before anything is built: the run folder exists (created if needed), takes a real write, and its file system
    has `need_bytes` free. Raises OutputWriteError naming the folder otherwise."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputWriteError(
            f'{key} {run_dir}: cannot create the run folder: {_reason(e, run_dir)}; {free_space(run_dir)}'
        ) from None
    problem = _probe(run_dir)
    if problem is not None:
        raise OutputWriteError(
            f'{key} {run_dir}: the run folder is not writable: {_reason(problem, run_dir)}; {free_space(run_dir)}'
        ) from None
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        raise OutputWriteError(
            f'{key} {run_dir}: only {human(free)} free on its file system, a checkpoint needs '
            f'about {human(need_bytes)}; free some space or choose another folder'
        )
