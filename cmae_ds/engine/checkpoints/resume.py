"""The one way into a resume (docs/resume.md). Every task, and a rollback, goes through two calls:

- `choose(resume, ckpt_dir, trust)`, before anything is built: which checkpoint (the newest intact one, or the one
  asked for; damaged ones are set aside or refused) and whether its files may be opened (modelfiles/safe_load.py,
  unless the run trusts them);
- `restore(run, tag, engine, model, ...)`, once the engine exists: `plan` decides the layout (the checkpoint's
  against this engine's, model config included), the form it is read in (DeepSpeed's own files, or the universal
  form through DeepSpeed's loader or elastic_zero0's), then the load, the data position in this run's layout, and
  this rank's random streams.

elastic.py and elastic_zero0.py hold the mechanics (facts, conversion, loaders, the position arithmetic); store.py
the files (marker, selection, DeepSpeed's own load).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ...config import ConfigError
from ...modelfiles.safe_load import scan_folder
from ..dist import barrier
from . import elastic, elastic_zero0, store
from .elastic import Layout

DEEPSPEED = 'deepspeed'  # DeepSpeed's own files, loaded as they are
UNIVERSAL = 'universal'  # the universal form, through DeepSpeed's loader (ZeRO 1-3 here)
UNIVERSAL_ZERO0 = 'universal-zero0'  # the universal form, read into a ZeRO-0 optimizer by elastic_zero0


def choose(resume: str, ckpt_dir: Path, trust: bool = False, log: Optional[Callable[[str], None]] = None):
    """Collective. The tag to resume from, or None for a fresh run (`resume`: 'auto', 'none' or a tag), its files
    checked for what they would run when unpickled unless `trust`; `log` takes the warnings (default: rank 0's
    stderr)."""
    tag = store.select_resume_tag(resume, ckpt_dir, **({} if log is None else {'log': log}))
    if tag is not None:
        scan_folder(ckpt_dir / tag, trust=trust)
    return tag


@dataclass(frozen=True)
class Here:
    """What a resume needs to know of the engine it loads into."""

    layout: Layout
    optimizer_form: str  # elastic_zero0.live_form: flat, copies or plain
    optimizer: str  # the optimizer's class name, for the message
    adam: bool  # whether it keeps Adam's moments, the only optimizer state the universal form carries

    @classmethod
    def of(cls, engine) -> 'Here':
        optimizer = elastic.base_optimizer(engine)
        return cls(
            Layout(**store.engine_layout(engine)),
            elastic_zero0.live_form(engine),
            type(optimizer).__name__,
            'betas' in optimizer.param_groups[0],
        )


@dataclass(frozen=True)
class Plan:
    """How checkpoint `where` resumes on this engine, decided before anything is loaded."""

    where: Path
    saved: Layout
    now: Layout
    form: str  # DEEPSPEED, UNIVERSAL or UNIVERSAL_ZERO0
    change: str  # the optimizer form that differs on a ZeRO-0 side, for the log ('' when none)
    trust: bool

    def position(self, progress: dict, steps_per_epoch: int) -> tuple[dict, Optional[str]]:
        """The saved progress in this run's layout, and a note when the data position moved."""
        return elastic.carry_position(progress, self.saved, self.now, steps_per_epoch)

    def describe(self) -> str:
        return f'written by {self.saved.describe()}{self.change}, resumed on {self.now.describe()}'


def plan(ckpt_dir: Path, tag: str, here: Here, model_cfg, trust: bool = False) -> Plan:
    """Decide a resume of `tag` on the engine described by `here`; a model config or optimizer that cannot resume
    stops here with one line."""
    where = ckpt_dir / tag
    saved, saved_model = elastic.saved_facts(ckpt_dir, tag, trust)
    elastic.check_model_config(saved_model, model_cfg, str(where))
    now = here.layout
    change = _other_zero0_form(saved, now, where, here.optimizer_form, trust)
    if not change and not elastic.needs_universal(saved, now, str(where)):
        return Plan(where, saved, now, DEEPSPEED, '', trust)
    if not here.adam:  # DeepSpeed's universal format carries Adam's two moments and nothing else
        raise ConfigError(
            f"{where}: resuming a {here.optimizer} run on another layout is not supported: DeepSpeed's "
            "universal checkpoints carry Adam's moments only, and this optimizer's momentum would be lost; resume "
            f"with the layout it was written with ({saved.describe()}), or use ZeRO-0 (the probe's default), "
            'which resumes on any number of ranks'
        )
    return Plan(where, saved, now, UNIVERSAL_ZERO0 if now.zero_stage == 0 else UNIVERSAL, change, trust)


def _other_zero0_form(saved: Layout, now: Layout, where: Path, live_form: str, trust: bool) -> str:
    """ZeRO-0 on both sides in one precision, but the optimizer in another form (bf16 with FusedAdam keeps one flat
    fp32 tensor per group, a non-fused optimizer a copy per parameter), which DeepSpeed's loader cannot read: the
    change, for the log; '' when there is none."""
    if (saved.zero_stage, now.zero_stage) != (0, 0) or saved.precision != now.precision:
        return ''
    states = elastic.open_states(elastic.model_states_file(where), trust)
    if not elastic_zero0.is_zero0(states):
        return ''
    then = elastic_zero0.saved_form(states['optimizer'])
    return '' if then == live_form else f' (optimizer form {then}, here {live_form})'


def restore(
    run,
    tag: Optional[str],
    engine,
    model,
    model_cfg,
    steps_per_epoch: int,
    streams: Optional[Callable[[Optional[dict], int], None]] = None,
) -> Optional[dict]:
    """Collective. Checkpoint `tag` of `run` (a loop.RunStart: its ckpt_dir, ctx and trust) into the engine on
    whatever layout this run has; returns the saved progress in this run's layout, or None when `tag` is None (a
    fresh run: nothing is touched). `streams(rank_state, step)` then sets this rank's random streams from its own
    saved state (None when the checkpoint has none for this rank: written by fewer ranks, or by a task that saves
    none)."""
    if tag is None:
        return None
    ckpt_dir, is_main, trust = run.ckpt_dir, run.ctx.is_main, run.trust
    decided = plan(ckpt_dir, tag, Here.of(engine), model_cfg, trust)
    state = _load(decided, engine, model, is_main)
    if decided.now.zero_stage == 3:
        # Loading leaves some ZeRO-3 parameters gathered (persistent ones among them); the first step after the
        # resume then records DeepSpeed's prefetch trace from that state, and the second fails on it with
        # 'tracing error ... expected the next 1 parameters'. Released, every step starts as on a fresh engine.
        engine.empty_partition_cache()
    progress, note = decided.position(state['progress'], steps_per_epoch)
    if note:
        _say(is_main, note)
    barrier()
    if streams is not None:
        streams(store.load_rank_state(ckpt_dir, tag, run.ctx.rank, trust=trust), progress['step'])
    return progress


def _load(decided: Plan, engine, model, is_main: bool) -> dict:
    """The checkpoint's client state, after loading it into the engine in the form `decided` says."""
    where, trust = decided.where, decided.trust
    if decided.form == DEEPSPEED:
        return store.load(engine, where.parent, where.name, trust=trust)
    folder = elastic.ensure_universal(where, is_main)
    if decided.form == UNIVERSAL_ZERO0:
        states = elastic.open_states(elastic.model_states_file(folder), trust)
        state = elastic_zero0.load_universal(engine, folder, states, trust)
        elastic.restore_unoptimized_state(model, states['module'], folder)
    else:
        state = elastic.load_universal(engine, model, folder, trust)
    _say(is_main, f'{where}: {decided.describe()} through its universal form {folder}')
    return state


def _say(is_main: bool, message: str) -> None:
    if is_main:
        print(f'cmae_ds: {message}', file=sys.stdout, flush=True)
