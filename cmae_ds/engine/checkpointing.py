"""Run checkpoints on top of DeepSpeed's: a completion marker per tag, an atomically replaced `latest` pointer, and
pruning to the last K. A crash or kill during a save leaves `latest` on the previous complete checkpoint.

The marker (complete.json) lists every file of the checkpoint, written by any rank, with its size and CRC-32, so a
resume can tell a damaged checkpoint (a truncated or deleted file) before loading it and fall back to the previous
one. A save that cannot write (full disk, read-only, permission) removes its partial folder on every rank's word
and stops the run with one line (output_dir.OutputWriteError).

Layout: <run>/checkpoints/<tag>/ (DeepSpeed's files + complete.json), <run>/checkpoints/latest (a tag name); a
damaged checkpoint that a resume passed over is renamed <tag>.damaged-<time> for inspection.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..checkpoint import CheckpointError
from ..config import ConfigError
from .dist import barrier
from .output_dir import OutputWriteError, is_write_failure, remove_partial, write_error

MARKER = 'complete.json'
POINTER = 'latest'
CHECKSUM = 'crc32'  # zlib's: 1.4 GB/s here in 8 MiB chunks, GIL released (sha1 1.3, md5 0.6, adler32 1.8)
BLOCK = 64 << 20  # one checksum per block: ranks and threads share the summing of a single large file
_CHUNK = 8 << 20


def tag_for(step: int) -> str:
    return f'step_{step:08d}'


def _step_of(tag: str) -> int:
    return int(tag.split('_')[-1]) if tag.startswith('step_') and tag.split('_')[-1].isdigit() else -1


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a completion marker, oldest first (folders set aside as damaged are not tags)."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and _step_of(p.name) >= 0 and (p / MARKER).is_file()]
    return sorted(tags, key=_step_of)


def find_resume_tag(ckpt_dir: Path) -> Optional[str]:
    """The pointer's tag when its checkpoint is complete, else the newest complete tag, else None."""
    pointer = ckpt_dir / POINTER
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (ckpt_dir / tag / MARKER).is_file():
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + '.tmp')
    try:
        with open(tmp, 'w') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def rng_state() -> dict:
    state = {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def rank_file(ckpt_dir: Path, tag: str, rank: int) -> Path:
    return ckpt_dir / tag / f'rank_state_{rank:05d}.pt'


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int, is_main: bool,
         rank_state: Optional[dict] = None) -> Path:
    """Save a DeepSpeed checkpoint for `step` (collective: every rank calls it), then list its files with their
    checksums in the marker and point to it.

    `rank_state` (RNG states and the like) is written by every rank to its own file: DeepSpeed keeps the client
    state of data-parallel rank 0 only, which would hand every rank the same random stream after a resume.
    A failed write on any rank removes the checkpoint's folder and raises OutputWriteError on every rank;
    `latest` and the older checkpoints stay as they were.
    """
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if is_main and (tag_dir / MARKER).exists():
        # a folder left at this tag (a run resumed from an older checkpoint) is not complete while it is rewritten
        (tag_dir / MARKER).unlink()
    error = _write_rank_files(engine, ckpt_dir, tag, client_state, rank_state)
    if os.environ.get('CMAE_TEST_KILL_DURING_SAVE') == tag:
        os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the resume test: files written, no marker
    # every rank's files are on disk (or one failed) before the checkpoint is declared complete
    _stop_if_failed(_gather(error), ckpt_dir, tag, is_main)
    files = _checksums(tag_dir, _gather(_sizes(tag_dir)))
    error = None
    if is_main:
        try:
            _atomic_write(tag_dir / MARKER, json.dumps({'step': step, 'tag': tag, 'checksum': CHECKSUM,
                                                        'files': files}))
            _atomic_write(ckpt_dir / POINTER, tag)
        except OSError as e:
            error = str(write_error('checkpoint marker', tag_dir / MARKER, e))
        else:
            prune(ckpt_dir, keep_last)
    _stop_if_failed(_gather(error), ckpt_dir, tag, is_main)
    return tag_dir


def _write_rank_files(engine, ckpt_dir: Path, tag: str, client_state: dict,
                      rank_state: Optional[dict]) -> Optional[str]:
    """This rank's part of a save; a failed write comes back as its one-line description (written while the
    file system is still full, so the reason and the free space are the ones that stopped it)."""
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    except Exception as e:
        if not is_write_failure(e):
            raise
        # DeepSpeed's closing barrier, which this rank skipped: ranks whose writes succeeded are waiting in it.
        barrier()
        return str(write_error('checkpoint', ckpt_dir / tag, e))
    if rank_state is not None:
        path = rank_file(ckpt_dir, tag, engine.global_rank)
        try:
            torch.save(rank_state, path)
        except Exception as e:
            if not is_write_failure(e):
                raise
            return str(write_error('checkpoint file', path, e))
    return None


def _stop_if_failed(errors: list, ckpt_dir: Path, tag: str, is_main: bool) -> None:
    failed = [e for e in errors if e]
    if not failed:
        return
    if is_main:
        remove_partial(ckpt_dir / tag)
    barrier()
    previous = find_resume_tag(ckpt_dir)
    kept = f'{POINTER} still names {previous}' if previous else 'there is no earlier checkpoint'
    raise OutputWriteError(f'{failed[0]}; the partial checkpoint was removed, {kept}')


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _sizes(tag_dir: Path) -> dict:
    """{relative path: bytes} of every file of a checkpoint folder as this rank sees it, marker and temporaries
    aside."""
    if not tag_dir.is_dir():
        return {}
    return {p.relative_to(tag_dir).as_posix(): p.stat().st_size for p in sorted(tag_dir.rglob('*'))
            if p.is_file() and p.name != MARKER and not p.name.endswith('.tmp')}


def block_crc32(path: Path, block: int) -> str:
    """CRC-32 of bytes [block * BLOCK, (block + 1) * BLOCK) of `path`, read in 8 MiB chunks into one buffer."""
    crc, buf = 0, bytearray(_CHUNK)
    view, left = memoryview(buf), BLOCK
    with open(path, 'rb', buffering=0) as f:
        f.seek(block * BLOCK)
        while left and (n := f.readinto(view[:min(_CHUNK, left)])):
            crc, left = zlib.crc32(view[:n], crc), left - n
    return f'{crc:08x}'


def _blocks(size: int) -> int:
    return max(1, -(-size // BLOCK))


def _in_threads(fn: Callable, items: list) -> list:
    """zlib releases the GIL while it sums, so a few threads read and sum blocks side by side."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(4, len(items))) as pool:
        return list(pool.map(fn, items))


def _checksums(tag_dir: Path, seen: list[dict]) -> dict:
    """{relative path: {size, crc32: [one per BLOCK]}} for every file any rank wrote (collective; `seen`: each rank's
    _sizes, taken once every rank has written). Each block is summed by one of the ranks that see its file: on a
    shared file system the work is spread over all ranks (a single large model file included), on node-local
    disks every node's files are still covered."""
    rank, _ = _rank_world()
    sizes = {}
    for part in reversed(seen):
        sizes.update(part)  # rank 0's view wins where views differ
    units = [(name, b) for name in sorted(sizes) for b in range(_blocks(sizes[name]))]
    seers = {name: [r for r, part in enumerate(seen) if name in part] for name in sizes}
    mine = [u for i, u in enumerate(units) if seers[u[0]][i % len(seers[u[0]])] == rank]
    sums = {}
    for part in _gather(dict(zip(mine, _in_threads(lambda u: block_crc32(tag_dir / u[0], u[1]), mine)))):
        sums.update(part)
    return {name: {'size': sizes[name], CHECKSUM: [sums[(name, b)] for b in range(_blocks(sizes[name]))]}
            for name in sorted(sizes)}


def manifest(ckpt_dir: Path, tag: str) -> Optional[dict]:
    """The file list of a complete checkpoint's marker; None for checkpoints written before markers had one."""
    marker = json.loads((ckpt_dir / tag / MARKER).read_text())
    return marker.get('files') if isinstance(marker, dict) else None


def _size_problem(tag_dir: Path, name: str, entry: dict) -> Optional[str]:
    path = tag_dir / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f'{path} is missing'
    return None if size == entry['size'] else f'{path} has {size} bytes, {entry["size"]} were written'


def _block_problem(tag_dir: Path, name: str, block: int, expected: str) -> Optional[str]:
    crc = block_crc32(tag_dir / name, block)
    if crc == expected:
        return None
    return (f'{tag_dir / name} does not match its {CHECKSUM} (bytes from {block * BLOCK}: {crc}, {expected} was '
            'written)')


def verify(ckpt_dir: Path, tag: str, files: dict) -> Optional[str]:
    """Collective. None when every listed file has its recorded size and checksums, else what is wrong with the
    first damaged file. Sizes come first (a missing or truncated file costs nothing to find); the blocks' checksums
    are then split over the ranks and summed in threads."""
    tag_dir = ckpt_dir / tag
    rank, world = _rank_world()
    found = [p for p in (_size_problem(tag_dir, n, files[n]) for n in sorted(files)) if p]
    found = [p for part in _gather(found) for p in part]  # all ranks agree even where their views differ
    if found:
        return found[0]
    units = [(n, b, crc) for n in sorted(files) for b, crc in enumerate(files[n][CHECKSUM])]
    found = [p for p in _in_threads(lambda u: _block_problem(tag_dir, *u), units[rank::world]) if p]
    found = [p for part in _gather(found) for p in part]
    return found[0] if found else None


def _marker_problem(ckpt_dir: Path, tag: str) -> tuple[Optional[dict], Optional[str]]:
    try:
        return manifest(ckpt_dir, tag), None
    except (OSError, ValueError) as e:
        return None, f'{ckpt_dir / tag / MARKER} is unreadable ({e})'


def check_tag(ckpt_dir: Path, tag: str, log: Callable[[str], None]) -> Optional[str]:
    """Collective. What is wrong with checkpoint `tag`, or None when it verifies (or has no file list to verify
    against, which is logged)."""
    files, problem = _marker_problem(ckpt_dir, tag)
    if problem:
        return problem
    if files is None:
        log(f'checkpoint {ckpt_dir / tag} was written before checkpoints listed their files: loading it unverified')
        return None
    return verify(ckpt_dir, tag, files)


def _warn(msg: str) -> None:
    if _rank_world()[0] == 0:
        print(f'warning: {msg}', file=sys.stderr, flush=True)


def _candidates(ckpt_dir: Path) -> list[str]:
    """Complete tags in resume order: the pointer's first, then newest to oldest."""
    tags = complete_tags(ckpt_dir)[::-1]
    first = find_resume_tag(ckpt_dir)
    return [first] + [t for t in tags if t != first] if first else tags


def select_resume_tag(resume: str, ckpt_dir: Path, log: Callable[[str], None] = _warn) -> Optional[str]:
    """The checkpoint to resume from (collective: every rank calls it and gets the same answer).

    'auto': the newest complete checkpoint that verifies; damaged newer ones are named in a warning and set aside.
    'none': None, refused when the folder already holds checkpoints. A tag (or a path ending in one): that
    checkpoint, which must exist and verify.
    """
    if resume == 'auto':
        return _newest_intact(ckpt_dir, log)
    if resume == 'none':
        existing = find_resume_tag(ckpt_dir)
        if existing is not None:
            raise ConfigError(f'{ckpt_dir} already holds checkpoints ({existing}); use --resume auto to continue '
                              'that run, or set train.output_dir to a new folder (nothing was overwritten)')
        return None
    tag = Path(resume).name
    if not (ckpt_dir / tag / MARKER).is_file():
        raise ConfigError(f'--resume {resume}: no complete checkpoint {tag} in {ckpt_dir}')
    problem = check_tag(ckpt_dir, tag, log)
    if problem:
        raise CheckpointError(f'--resume {resume}: checkpoint {tag} is damaged: {problem}')
    return tag


def _newest_intact(ckpt_dir: Path, log: Callable[[str], None]) -> Optional[str]:
    damaged = []
    for tag in _candidates(ckpt_dir):
        problem = check_tag(ckpt_dir, tag, log)
        if problem is None:
            for bad, why in damaged:
                aside = _set_aside(ckpt_dir, bad)
                log(f'checkpoint {bad} is damaged ({why}): resuming from {tag} instead'
                    + (f'; the damaged one was moved to {aside}' if aside else ''))
            return tag
        damaged.append((tag, problem))
    if damaged:
        raise CheckpointError(f'no checkpoint in {ckpt_dir} is intact: '
                              + '; '.join(f'{tag}: {why}' for tag, why in damaged))
    return None


def _set_aside(ckpt_dir: Path, tag: str) -> Optional[Path]:
    """Rename a damaged checkpoint out of the tag namespace (rank 0; collective): kept for inspection, never
    resumed from or pruned, and its step can be saved again."""
    aside = ckpt_dir / f'{tag}.damaged-{time.strftime("%Y%m%d-%H%M%S")}'
    moved = True
    if _rank_world()[0] == 0:
        try:
            (ckpt_dir / tag).rename(aside)
        except OSError:
            moved = False  # it stays; the next save of its step drops its marker first
    barrier()
    return aside if moved else None


def newest_size(ckpt_dir: Path) -> int:
    """Bytes of the newest complete checkpoint (0 when there is none): what the next save needs free."""
    tags = complete_tags(ckpt_dir)
    if not tags:
        return 0
    return sum(p.stat().st_size for p in (ckpt_dir / tags[-1]).rglob('*') if p.is_file())


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Remove complete checkpoints beyond the newest `keep_last`, and partial ones older than the newest complete."""
    tags = complete_tags(ckpt_dir)
    if not tags:
        return
    newest = _step_of(tags[-1])
    doomed = tags[:-keep_last] if keep_last > 0 else []
    doomed += [p.name for p in ckpt_dir.iterdir()
               if p.is_dir() and not (p / MARKER).exists() and 0 <= _step_of(p.name) < newest]
    for tag in doomed:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def load_rank_state(ckpt_dir: Path, tag: str, rank: int) -> Optional[dict]:
    """This rank's own saved state, or None when the checkpoint was written by a run with fewer ranks."""
    path = rank_file(ckpt_dir, tag, rank)
    return torch.load(path, weights_only=False) if path.is_file() else None


def load(engine, ckpt_dir: Path, tag: str) -> dict:
    """Load model, optimizer and scheduler state of `tag` into the engine; returns the client state."""
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=True,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f'DeepSpeed could not load checkpoint {ckpt_dir / tag}')
    return client_state
