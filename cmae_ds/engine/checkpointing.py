"""Run checkpoints on top of DeepSpeed's: a completion marker per tag, an atomically replaced `latest` pointer, and
pruning to the last K. A crash or kill during a save leaves `latest` on the previous complete checkpoint.

Layout: <run>/checkpoints/<tag>/ (DeepSpeed's files + complete.json), <run>/checkpoints/latest (a tag name).
"""
from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..atomic_write import atomic_write_text
from ..config import ConfigError
from .dist import barrier

MARKER = 'complete.json'
POINTER = 'latest'


def tag_for(step: int) -> str:
    return f'step_{step:08d}'


def _step_of(tag: str) -> int:
    return int(tag.split('_')[-1]) if tag.startswith('step_') and tag.split('_')[-1].isdigit() else -1


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a completion marker, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / MARKER).is_file()]
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


def resume_tag(resume: str, ckpt_dir: Path) -> Optional[str]:
    """The tag a run starts from: `resume` is 'auto' (the newest complete checkpoint, or none), 'none' (refuse a
    folder that holds checkpoints) or a tag (which must be complete)."""
    existing = find_resume_tag(ckpt_dir)
    if resume == 'auto':
        return existing
    if resume == 'none':
        if existing is not None:
            raise ConfigError(f'{ckpt_dir} already holds checkpoints ({existing}); use --resume auto to continue '
                              'that run, or set train.output_dir to a new folder (nothing was overwritten)')
        return None
    tag = Path(resume).name
    if not (ckpt_dir / tag / MARKER).is_file():
        raise ConfigError(f'--resume {resume}: no complete checkpoint {tag} in {ckpt_dir}')
    return tag


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
    """Save a DeepSpeed checkpoint for `step` (collective: every rank calls it), then mark it and point to it.

    `rank_state` (RNG states and the like) is written by every rank to its own file: DeepSpeed keeps the client
    state of data-parallel rank 0 only, which would hand every rank the same random stream after a resume.
    """
    tag = tag_for(step)
    layout = engine_layout(engine)
    if is_main and (ckpt_dir / tag).exists():  # a renumbered run (another global batch) reusing an old tag
        shutil.rmtree(ckpt_dir / tag)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={**client_state, 'layout': layout},
                           save_latest=False)
    if rank_state is not None:
        torch.save(rank_state, rank_file(ckpt_dir, tag, engine.global_rank))
    barrier()  # every rank's shard is on disk before the checkpoint is declared complete
    if is_main:
        mark_complete(ckpt_dir, tag, step, layout=layout, model=client_state.get('config', {}).get('model'))
        prune(ckpt_dir, keep_last)
    barrier()
    return ckpt_dir / tag


def engine_layout(engine) -> dict:
    """How the engine splits the global batch and the optimizer state: what a resume must match or convert."""
    return {'world_size': engine.dp_world_size, 'zero_stage': int(engine.zero_optimization_stage()),
            'micro_batch': engine.train_micro_batch_size_per_gpu(),
            'grad_accum': engine.gradient_accumulation_steps()}


def read_marker(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((ckpt_dir / tag / MARKER).read_text())


def mark_complete(ckpt_dir: Path, tag: str, step: int, **extra) -> None:
    """The checkpoint counts from here on: its marker, then the pointer to it. `extra` (layout, model config)
    lets a resume decide without opening DeepSpeed's files; the time tells a rewritten tag from its
    predecessor (engine.elastic's cache)."""
    atomic_write_text(ckpt_dir / tag / MARKER, json.dumps({'step': step, 'tag': tag, 'time': time.time(), **extra}))
    atomic_write_text(ckpt_dir / POINTER, tag)


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
        self.last_saved = save(self.engine, self.ckpt_dir, step, self.client_state(), self.keep_last, self.is_main,
                               rank_state=rank_state)
        return self.last_saved
