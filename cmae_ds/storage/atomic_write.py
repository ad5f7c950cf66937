"""The one way this project writes a file that must never be seen half-written: into a temporary file beside it,
flushed to disk, then renamed over the target (a rename within a folder is atomic on POSIX file systems)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional


def atomic_write(
    path: Path,
    write: Callable[[Any], None],
    mode: str = 'wb',
    describe: Optional[Callable[[Exception], Optional[Exception]]] = None,
) -> Path:
    """`write(f)` fills the temporary file; on any error it is removed and `path` is left as it was.
    `describe(error)`, called before the removal (a full disk is still full then), may return the exception to
    raise instead."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        replacement = describe(e) if describe is not None else None
        tmp.unlink(missing_ok=True)
        if replacement is None:
            raise
        raise replacement from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode='w')
