"""One process builds a shard folder's index (shard_index.load_index): it creates the lock file with O_EXCL beside
the index file, writes the index to a mkstemp file in the same folder and renames it; the other ranks wait for the
lock to go and read the result. A lock whose process is gone (same host), or not touched for STALE_LOCK_S (the
builder touches it after every shard), is taken over.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = '.shards.index.lock'
STALE_LOCK_S = 600.0


def take_lock(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, 'w') as f:
        f.write(f'{socket.gethostname()} {os.getpid()}\n')
    return True


def touch(lock: Path) -> None:
    try:
        os.utime(lock)
    except OSError:
        pass


def wait_for_lock(lock: Path, root: Path, poll: float = 0.05) -> None:
    """Until the lock is gone; a lock left by a dead builder is removed (the caller then takes it). The poll backs
    off to 2 s: a thousand waiting ranks are a thousand stats a poll on the shards' file server."""
    log.info('data: waiting for another process to index %s (%s)', root, lock)
    while True:
        try:
            text, age = lock.read_text(), time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if _abandoned(text, age):
            log.warning('data: %s was left by a builder that is gone (%s); taking it over', lock, text.strip())
            lock.unlink(missing_ok=True)
            return
        time.sleep(poll)
        poll = min(2.0, poll * 1.5)


def _abandoned(text: str, age: float) -> bool:
    if age > STALE_LOCK_S:
        return True
    host, _, pid = text.strip().partition(' ')
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
