"""Run checkpoints on top of DeepSpeed's: a completion marker per tag listing every file with its checksums
(verify.py), an atomically replaced `latest` pointer, resume selection that passes over damaged
checkpoints, pruning to the last K, and `Checkpointer`, which owns when a run saves. A crash or kill during a save
leaves `latest` on the previous complete checkpoint; a save that cannot write (full disk, read-only, permission)
removes its partial folder on every rank's word and stops the run with one line (output_dir.OutputWriteError).

Layout: <run>/checkpoints/<tag>/ (DeepSpeed's files + complete.json), <run>/checkpoints/latest (a tag name); a
damaged checkpoint that a resume passed over is renamed <tag>.damaged-<time> for inspection.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ...config import ConfigError
from ...modelfiles.safe_load import CheckpointError, checked_deepspeed_loads, load_checkpoint_file, scan_folder
from ...storage.atomic_write import atomic_write_text
from ...storage.output_dir import OutputWriteError, is_write_failure, remove_partial, write_error
from ..dist import barrier, gather_objects, rank_world
from .elastic_zero0 import names_entry
from .verify import CHECKSUM, MARKER, check_tag, checksums, sizes

POINTER = 'latest'


def tag_for(step: int) -> str:
    return f'step_{step:08d}'


def _step_of(tag: str) -> int:
    return int(tag.split('_')[-1]) if tag.startswith('step_') and tag.split('_')[-1].isdigit() else -1


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a completion marker, oldest first (folders set aside as damaged are not tags)."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and _step_of(p.name) >= 0 and (p / MARKER).is_file()]
    return sorted(tags, key=lambda tag: (_saved_at(ckpt_dir, tag), _step_of(tag)))


def _saved_at(ckpt_dir: Path, tag: str) -> float:
    """When the marker was written (0 for markers older than that field): a resume with another global batch
    renumbers the steps, so tag numbers alone may not be in the order the checkpoints were written."""
    try:
        return float(read_marker(ckpt_dir, tag).get('time', 0.0))
    except (OSError, ValueError):
        return 0.0


def find_resume_tag(ckpt_dir: Path) -> Optional[str]:
    """The pointer's tag when its checkpoint is complete, else the newest complete tag, else None."""
    pointer = ckpt_dir / POINTER
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (ckpt_dir / tag / MARKER).is_file():
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def _warn(msg: str) -> None:
    if rank_world()[0] == 0:
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
            raise ConfigError(
                f'{ckpt_dir} already holds checkpoints ({existing}); use --resume auto to continue '
                'that run, or set train.output_dir to a new folder (nothing was overwritten)'
            )
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
                log(
                    f'checkpoint {bad} is damaged ({why}): resuming from {tag} instead'
                    + (f'; the damaged one was moved to {aside}' if aside else '')
                )
            return tag
        damaged.append((tag, problem))
    if damaged:
        raise CheckpointError(
            f'no checkpoint in {ckpt_dir} is intact: ' + '; '.join(f'{tag}: {why}' for tag, why in damaged)
        )
    return None


def _set_aside(ckpt_dir: Path, tag: str) -> Optional[Path]:
    """Rename a damaged checkpoint out of the tag namespace (rank 0; collective): kept for inspection, never
    resumed from or pruned, and its step can be saved again."""
    aside = ckpt_dir / f'{tag}.damaged-{time.strftime("%Y%m%d-%H%M%S")}'
    moved = True
    if rank_world()[0] == 0:
        try:
            (ckpt_dir / tag).rename(aside)
        except OSError:
            moved = False  # it stays; the next save of its step drops its marker first
    barrier()
    return aside if moved else None


def rng_state() -> dict:
    """Every global random stream of this process, as tensors and plain values (a file that loads weights-only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {
        'kind': kind,
        'keys': torch.from_numpy(keys.astype(np.int64)),
        'pos': int(pos),
        'has_gauss': int(has_gauss),
        'gauss': float(gauss),
    }
    state = {'torch': torch.get_rng_state(), 'numpy': numpy_state, 'python': random.getstate()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state(saved) -> tuple:
    """np.random.set_state's tuple; checkpoints written before the tensor form hold that tuple itself."""
    if not isinstance(saved, dict):
        return saved
    return saved['kind'], saved['keys'].numpy().astype(np.uint32), saved['pos'], saved['has_gauss'], saved['gauss']


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    np.random.set_state(_numpy_state(state['numpy']))
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def rank_file(ckpt_dir: Path, tag: str, rank: int) -> Path:
    return ckpt_dir / tag / f'rank_state_{rank:05d}.pt'


def save(
    engine,
    ckpt_dir: Path,
    step: int,
    client_state: dict,
    keep_last: int,
    is_main: bool,
    rank_state: Optional[dict] = None,
) -> Path:
    """Save a DeepSpeed checkpoint for `step` (collective: every rank calls it), then list its files with their
    checksums in the marker and point to it.

    `rank_state` (RNG states and the like) is written by every rank to its own file: DeepSpeed keeps the client
    state of data-parallel rank 0 only, which would hand every rank the same random stream after a resume.
    A failed write on any rank removes the checkpoint's folder and raises OutputWriteError on every rank;
    `latest` and the older checkpoints stay as they were.
    """
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    layout = engine_layout(engine)
    if is_main and tag_dir.exists() and not _kept_aside(ckpt_dir, tag, layout):
        # A folder left at this tag (a run resumed from an older checkpoint, or a partial save):
        # unmarked first, so a crash while it is removed never leaves a "complete" mix of old and new files.
        (tag_dir / MARKER).unlink(missing_ok=True)
        shutil.rmtree(tag_dir, ignore_errors=True)
    barrier()
    client_state = {**client_state, 'layout': layout, **names_entry(engine)}
    error = _write_rank_files(engine, ckpt_dir, tag, client_state, rank_state)
    # every rank's files are on disk (or one failed) before the checkpoint is declared complete
    _stop_if_failed(gather_objects(error), ckpt_dir, tag, is_main)
    files = checksums(tag_dir, gather_objects(sizes(tag_dir)))
    error = None
    if is_main:
        try:
            mark_complete(ckpt_dir, tag, step, files, layout=layout, model=client_state.get('config', {}).get('model'))
        except OSError as e:
            error = str(write_error('checkpoint marker', tag_dir / MARKER, e))
        else:
            prune(ckpt_dir, keep_last)
    _stop_if_failed(gather_objects(error), ckpt_dir, tag, is_main)
    return tag_dir


def _global_batch(layout: dict) -> int:
    return layout['world_size'] * layout['micro_batch'] * layout['grad_accum']


def _kept_aside(ckpt_dir: Path, tag: str, layout: dict) -> bool:
    """A complete checkpoint of another global batch at this tag is a good one that a resize renumbered into this
    run's way (engine/checkpoints/elastic.py), often the one the run resumed from: renamed out of the tag namespace
    (<tag>.gb<N>, never pruned) instead of overwritten. True when it was moved."""
    try:
        saved = read_marker(ckpt_dir, tag).get('layout')
    except (OSError, ValueError):
        return False
    if not saved or _global_batch(saved) == _global_batch(layout):
        return False
    aside = ckpt_dir / f'{tag}.gb{_global_batch(saved)}-{time.strftime("%Y%m%d-%H%M%S")}'
    try:
        (ckpt_dir / tag).rename(aside)
    except OSError:
        return False
    print(f'cmae_ds: checkpoint {tag} of global batch {_global_batch(saved)} kept as {aside.name}', flush=True)
    return True


def engine_layout(engine) -> dict:
    """How the engine splits the global batch and keeps the optimizer state: what a resume must match or convert."""
    return {
        'world_size': engine.dp_world_size,
        'zero_stage': int(engine.zero_optimization_stage()),
        'micro_batch': engine.train_micro_batch_size_per_gpu(),
        'grad_accum': engine.gradient_accumulation_steps(),
        'precision': 'bf16' if engine.bfloat16_enabled() else 'fp16' if engine.fp16_enabled() else 'fp32',
    }


def read_marker(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((ckpt_dir / tag / MARKER).read_text())


def mark_complete(ckpt_dir: Path, tag: str, step: int, files: dict, **extra) -> None:
    """The checkpoint counts from here on: its marker (with the file list), then the pointer to it. `extra`
    (layout, model config) lets a resume decide without opening DeepSpeed's files; the time tells a rewritten tag
    from its predecessor (engine.elastic's cache)."""
    atomic_write_text(
        ckpt_dir / tag / MARKER,
        json.dumps({'step': step, 'tag': tag, 'time': time.time(), 'checksum': CHECKSUM, 'files': files, **extra}),
    )
    atomic_write_text(ckpt_dir / POINTER, tag)


def _write_rank_files(
    engine, ckpt_dir: Path, tag: str, client_state: dict, rank_state: Optional[dict]
) -> Optional[str]:
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
    doomed += [
        p.name
        for p in ckpt_dir.iterdir()
        if p.is_dir() and not (p / MARKER).exists() and 0 <= _step_of(p.name) < newest
    ]
    for tag in doomed:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def load_rank_state(ckpt_dir: Path, tag: str, rank: int, *, trust: bool = False) -> Optional[dict]:
    """This rank's own saved state, or None when the checkpoint was written by a run with fewer ranks."""
    path = rank_file(ckpt_dir, tag, rank)
    return load_checkpoint_file(path, trust=trust) if path.is_file() else None


def load(engine, ckpt_dir: Path, tag: str, *, trust: bool = False) -> dict:
    """Load model, optimizer and scheduler state of `tag` into the engine; returns the client state.

    Every file of the tag is scanned first (modelfiles/safe_load.py), also those DeepSpeed reads with its own torch.load
    (universal checkpoints), and the engine's checkpoint engine reads weights-only; `trust` skips both."""
    scan_folder(ckpt_dir / tag, trust=trust)
    with checked_deepspeed_loads(engine, trust=trust):
        path, client_state = engine.load_checkpoint(
            str(ckpt_dir), tag=tag, load_module_strict=True, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    if path is None:
        raise RuntimeError(f'DeepSpeed could not load checkpoint {ckpt_dir / tag}')
    return client_state


@dataclass
class Checkpointer:
    """Owns when a run saves (every `every` steps, at its last step, and at each epoch's end when
    `at_epoch_end`) and what goes in: the client state (rank 0's, in DeepSpeed's files) and each rank's own."""

    engine: object
    ckpt_dir: Path
    every: int
    keep_last: int
    is_main: bool
    client_state: Callable[[], dict]
    rank_state: Optional[Callable[[], dict]] = None
    at_epoch_end: bool = False
    last_saved: Optional[Path] = None

    def due(self, step: int, *, final: bool, epoch_end: bool = False) -> bool:
        return final or (self.every > 0 and step % self.every == 0) or (epoch_end and self.at_epoch_end)

    def save(self, step: int) -> Path:
        rank_state = self.rank_state() if self.rank_state is not None else None
        self.last_saved = save(
            self.engine, self.ckpt_dir, step, self.client_state(), self.keep_last, self.is_main, rank_state=rank_state
        )
        return self.last_saved
