"""The mechanics of resuming on another number of ranks, ZeRO stage or precision (docs/resume.md); what a resume
does is decided in resume.py, the one way in.

DeepSpeed's own checkpoints hold each rank's shard of the optimizer and reopen only on the world size, ZeRO stage
and precision that wrote them. When one differs, the checkpoint is converted once to DeepSpeed's universal format
(one folder per parameter: fp32 weights, Adam moments, step), cached as <tag>/universal beside the original files,
and loaded with `load_universal`. DeepSpeed converts and loads ZeRO 1-3 only; a ZeRO-0 side (the whole optimizer
in every rank's file) is written and read by elastic_zero0.py. That path restores only what the optimizer
holds, so afterwards:
- the target branch (EMA, outside DeepSpeed) and the module buffers (fixed pos-embeds, BatchNorm statistics) are
  copied from the module state saved in the checkpoint;
- every optimizer group gets back its own hyperparameters (ZeRO-3's universal load copies group 0's weight decay
  onto every group).

The data position is carried in images. Optimizer step s of an epoch covers the images [s*G, (s+1)*G) of the
epoch's order whatever the layout (`ShardPlan` gives rank r the positions r, r+W, ...), so a kept global batch G
resumes at the same image; another global batch resumes at its first step boundary at or after the first unseen
image, and the step count is renumbered so that the lr and momentum schedules keep their position in the epochs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
from argparse import Namespace
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from ...config import ConfigError
from ...config.ds_config import resolve_precision
from ...modelfiles.safe_load import checked_deepspeed_loads, load_checkpoint_file, scan_folder
from . import elastic_zero0
from .store import MARKER, read_marker

UNIVERSAL = 'universal'
SOURCE = 'source.json'  # the original's marker, copied: a rewritten tag invalidates the cache
MIN_DEEPSPEED = '0.14.4'
# Model fields a resume may change: how the forward is executed, not what it computes or stores.
EXECUTION_FIELDS = ('activation_checkpointing',)
ZERO1_FILES = elastic_zero0.MODEL_STATES
ZERO3_FILES = 'zero_pp_rank_{}_mp_rank_00_model_states.pt'


@dataclass(frozen=True)
class Layout:
    world_size: int
    zero_stage: int
    micro_batch: int
    grad_accum: int
    precision: Optional[str] = None  # None: a marker written before it was recorded (then read from DeepSpeed's)

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch * self.grad_accum

    @property
    def images_per_micro_step(self) -> int:
        return self.world_size * self.micro_batch

    def describe(self) -> str:
        return (
            f'{self.world_size} rank(s) x micro {self.micro_batch} x accumulation {self.grad_accum} '
            f'(global {self.global_batch}), ZeRO-{self.zero_stage}' + (f' {self.precision}' if self.precision else '')
        )


def model_states_file(tag_dir: Path) -> Path:
    for path in (tag_dir / ZERO1_FILES, tag_dir / ZERO3_FILES.format(0)):
        if path.is_file():
            return path
    raise ConfigError(f'{tag_dir}: no DeepSpeed model states file ({ZERO1_FILES} or {ZERO3_FILES.format(0)})')


def open_states(path: Path, trust: bool = False) -> dict:
    """A DeepSpeed states file, memory-mapped (reading its metadata does not read its tensors), through
    cmae_ds.modelfiles.safe_load like every checkpoint file."""
    return load_checkpoint_file(path, trust=trust, mmap=True)


def saved_facts(ckpt_dir: Path, tag: str, trust: bool = False) -> tuple[Layout, Optional[dict]]:
    """(layout, model config) of a checkpoint: from our marker, or, for checkpoints written before the marker
    carried them, from DeepSpeed's states file (its JSON and world size, our client state)."""
    marker = read_marker(ckpt_dir, tag)
    if marker.get('layout', {}).get('precision'):
        return Layout(**marker['layout']), marker.get('model')
    path = model_states_file(ckpt_dir / tag)
    states = open_states(path, trust)
    ds = states.get('ds_config') or {}
    layout = Layout(
        world_size=int(states['dp_world_size']),
        zero_stage=int(ds.get('zero_optimization', {}).get('stage', 0)),
        micro_batch=int(ds['train_micro_batch_size_per_gpu']),
        grad_accum=int(ds.get('gradient_accumulation_steps', 1)),
        precision=resolve_precision(ds, str(path)),
    )
    return layout, marker.get('model', (states.get('config') or {}).get('model'))


def check_model_config(saved: Optional[dict], model_cfg, where: str) -> None:
    """One line naming every model field that differs from the checkpoint's."""
    if saved is None:
        return
    now = json.loads(json.dumps(asdict(model_cfg)))
    then = json.loads(json.dumps(saved))
    diff = [
        f'model.{k}={then.get(k)!r} there, {now.get(k)!r} here'
        for k in sorted(set(now) | set(then))
        if k not in EXECUTION_FIELDS and then.get(k) != now.get(k)
    ]
    if diff:
        raise ConfigError(
            f'{where} was written by a run with another model config: {"; ".join(diff)} (resume it '
            'with the model config it was trained with, or start a new run with --resume none)'
        )


def needs_universal(saved: Layout, now: Layout, where: str) -> bool:
    """Whether DeepSpeed's own files cannot be loaded as they are (then the checkpoint goes through its universal
    form; engine/elastic_zero0.py writes and reads that form on a ZeRO-0 side)."""
    other_precision = None not in (saved.precision, now.precision) and saved.precision != now.precision
    # DeepSpeed's loaders expect the optimizer form of their own precision (files named after it, fp32 copies or not)
    if (saved.zero_stage, saved.world_size) == (now.zero_stage, now.world_size) and not other_precision:
        return False
    if saved.zero_stage == 0 and now.zero_stage == 0 and not other_precision:
        return False  # every rank saved and loads the whole optimizer state
    _check_deepspeed_version()
    return True


def _check_deepspeed_version() -> None:
    import deepspeed
    from packaging.version import Version

    if Version(deepspeed.__version__.split('+')[0]) < Version(MIN_DEEPSPEED):
        raise ConfigError(
            f'resuming on another number of ranks or ZeRO stage needs DeepSpeed >= {MIN_DEEPSPEED} '
            f'(universal checkpoints); this is {deepspeed.__version__}: pip install '
            f'"deepspeed>={MIN_DEEPSPEED}", or resume with the layout the checkpoint was written with'
        )


# --- conversion -------------------------------------------------------------------------------------------------


def universal_dir(tag_dir: Path) -> Path:
    return tag_dir / UNIVERSAL


def cached(tag_dir: Path) -> bool:
    out = universal_dir(tag_dir)
    return (out / SOURCE).is_file() and (out / SOURCE).read_text() == (tag_dir / MARKER).read_text()


def convert(tag_dir: Path, workers: int = 1) -> Path:
    """<tag>/universal from the checkpoint in `tag_dir` (built in a temporary folder, then renamed: an interrupted
    conversion leaves no half cache), unless a cache of this very checkpoint exists. The original is untouched."""
    out = universal_dir(tag_dir)
    if cached(tag_dir):
        return out
    for stale in [p for p in tag_dir.iterdir() if p.name.startswith(f'.{UNIVERSAL}.')] + [out]:
        # DeepSpeed's reader walks the folder recursively: a leftover copy of the model states would be read too
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tag_dir / f'.{UNIVERSAL}.{os.getpid()}'
    states = open_states(model_states_file(tag_dir))
    if elastic_zero0.is_zero0(states):  # DeepSpeed's converter reads ZeRO 1-3 shards only
        try:
            elastic_zero0.write_universal(states, tag_dir, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:
        _ds_to_universal(tag_dir, tmp, workers)
        (tag_dir / 'latest_universal').unlink(missing_ok=True)  # ds_to_universal points its parent folder at tmp
    _add_model_states_names(tmp)
    _serve_every_stage(tmp / 'zero')
    shutil.copyfile(tag_dir / MARKER, tmp / SOURCE)
    os.rename(tmp, out)
    return out


def _ds_to_universal(src: Path, dst: Path, workers: int) -> None:
    from deepspeed.checkpoint import ds_to_universal

    # inject_missing_state: the default universal_checkpoint_info (no tensor parallelism) that only Megatron-style
    # modules carry themselves
    args = Namespace(
        input_folder=str(src),
        output_folder=str(dst),
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), _compact_saves(ds_to_universal):
            ds_to_universal.main(args)
    except Exception as e:  # DeepSpeed raises asserts, RuntimeErrors and KeyErrors alike
        shutil.rmtree(dst, ignore_errors=True)
        last = (str(e) or type(e).__name__).splitlines()[0][:300]
        raise ConfigError(
            f'{src}: DeepSpeed could not convert this checkpoint to the universal format ({last}); '
            'resume it with the number of ranks and ZeRO stage it was written with'
        ) from e


def _compact(obj):
    if torch.is_tensor(obj) and obj.untyped_storage().nbytes() > obj.numel() * obj.element_size():
        return obj.clone()
    if isinstance(obj, dict):  # a shallow copy keeps the mapping's own type (OrderedDict, defaultdict)
        out = copy.copy(obj)
        for k, v in out.items():
            out[k] = _compact(v)
        return out
    if type(obj) in (list, tuple):  # torch.Size and named tuples hold no tensors
        return type(obj)(_compact(v) for v in obj)
    return obj


class _CompactTorch:
    """torch, except that save writes a view without the rest of its storage."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def save(obj, f, *args, **kwargs):
        torch.save(_compact(obj), f, *args, **kwargs)


@contextlib.contextmanager
def _compact_saves(module):
    """ds_to_universal saves each module tensor to its own file, and torch.save writes a view's whole storage: with
    the target branch in one flat buffer (CMAE's flat EMA) every frozen parameter's file held all of it, and a
    2.2 GB ViT-B checkpoint became 52 GB (quadratic in the model size). Only that module's `torch` is swapped."""
    module.torch = _CompactTorch()
    try:
        yield
    finally:
        module.torch = torch


def _add_model_states_names(folder: Path) -> None:
    """The universal load reads the client state from the model states file under the name the *loading* stage
    uses (ZeRO-3: per-rank files; 1-2: one file); give the folder both names (hard links where possible)."""
    ours = model_states_file(folder)
    for name in (ZERO1_FILES, ZERO3_FILES.format(0)):
        if not (folder / name).exists():
            try:
                os.link(ours, folder / name)
            except OSError:
                shutil.copyfile(ours, folder / name)


def _serve_every_stage(zero: Path) -> None:
    """ds_to_universal writes the optimizer's global state in the layout of the stage that saved it, and the
    loaders differ: ZeRO-3 reads the Adam step from optimizer_state.pt's inner optimizer state, ZeRO-1/2 from a
    step.pt beside each parameter. Give the folder both, so that it loads on every stage."""
    import deepspeed

    path = zero / 'optimizer_state.pt'
    state = load_checkpoint_file(path)
    inner = state.get('optimizer_state_dict')
    params = [p for p in zero.iterdir() if p.is_dir()]
    if inner is None:  # written from ZeRO-1/2
        steps = [p / 'step.pt' for p in params if (p / 'step.pt').is_file()]
        if steps:
            step = load_checkpoint_file(steps[0])
            state['optimizer_state_dict'] = {'state': {0: {'step': step}}, 'param_groups': state['param_groups']}
    else:  # written from ZeRO-3
        step = inner['state'][0]['step']
        for p in params:
            if not (p / 'step.pt').exists():
                torch.save(step, p / 'step.pt')
            for key in ('fp32', 'exp_avg', 'exp_avg_sq'):  # ZeRO-1/2 read {'param': tensor}, ZeRO-3 either form
                tensor = load_checkpoint_file(p / f'{key}.pt')
                if torch.is_tensor(tensor):
                    torch.save({'param': tensor}, p / f'{key}.pt')
    state.setdefault('ds_version', deepspeed.__version__)
    torch.save(state, path)


def ensure_universal(tag_dir: Path, is_main: bool) -> Path:
    """Collective: rank 0 converts (or finds the cache), every rank learns the outcome; a failure is one
    ConfigError on every rank instead of a rank waiting forever."""
    error = None
    if is_main:
        try:
            convert(tag_dir)
        except ConfigError as e:
            error = str(e)
    if torch.distributed.is_initialized():
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ConfigError(error)
    return universal_dir(tag_dir)


# --- loading ----------------------------------------------------------------------------------------------------


def base_optimizer(engine):
    return getattr(engine.optimizer, 'optimizer', engine.optimizer)


def _group_settings(optimizer) -> list[dict]:
    """Each group's hyperparameters (not its parameters, not a step counter some optimizers keep there)."""
    return [{k: v for k, v in group.items() if k not in ('params', 'step')} for group in optimizer.param_groups]


def load_universal(engine, model, folder: Path, trust: bool = False) -> dict:
    """Load a universal checkpoint folder into the engine and the module state DeepSpeed leaves out; returns the
    client state. Every file of the folder is checked first (DeepSpeed opens the shards with its own torch.load)."""
    optimizer = base_optimizer(engine)
    settings = _group_settings(optimizer)
    scan_folder(folder, trust=trust)
    engine._config.load_universal_checkpoint = True
    try:
        with checked_deepspeed_loads(engine, trust=trust):
            path, client_state = engine.load_checkpoint(
                str(folder.parent),
                tag=folder.name,
                load_module_strict=True,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
    finally:
        engine._config.load_universal_checkpoint = False
    if path is None:
        raise ConfigError(f'DeepSpeed could not load the universal checkpoint {folder}')
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
    _unshare_step_counters(optimizer)
    restore_unoptimized_state(model, open_states(model_states_file(folder), trust)['module'], folder)
    return client_state


def _unshare_step_counters(optimizer) -> None:
    """ZeRO-3's universal load gives every sub-group the same `step` tensor object; torch's Adam increments each
    state's counter in place, so a shared one advanced once per sub-group per step (2 -> 4 after one step here),
    and the bias correction, hence every update, went wrong from the first step after the resume."""
    for state in optimizer.state.values():
        if torch.is_tensor(state.get('step')):
            state['step'] = state['step'].clone()


def restore_unoptimized_state(model, saved: dict, where: Path) -> list[str]:
    """Copy every tensor of the module's state that no optimizer holds (buffers, frozen parameters, the target
    branch's `target_*`) from `saved`; returns the names copied."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    live = model.state_dict(keep_vars=True)  # tensors sharing storage with the module's own
    names = [name for name in live if name not in trained]
    missing = [name for name in names if name not in saved or saved[name].numel() != live[name].numel()]
    if missing:
        raise ConfigError(
            f'{where}: the saved module state lacks {", ".join(missing[:5])}'
            + (f' and {len(missing) - 5} more' if len(missing) > 5 else '')
        )
    with torch.no_grad():
        for name in names:
            live[name].copy_(saved[name].reshape(live[name].shape))
    return names


# --- data position ----------------------------------------------------------------------------------------------


def carry_position(progress: dict, saved: Layout, now: Layout, steps_per_epoch: int) -> tuple[dict, Optional[str]]:
    """`progress` (epoch, batch_in_epoch in micro-batches of one rank, step) re-expressed in the layout `now`,
    and a note for the log when the position moved."""
    images = progress['batch_in_epoch'] * saved.images_per_micro_step
    if now.global_batch == saved.global_batch:
        return {**progress, 'batch_in_epoch': images // now.images_per_micro_step}, None
    g = now.global_batch
    epoch, step_in_epoch = progress['epoch'], -(-images // g)
    if step_in_epoch >= steps_per_epoch:
        epoch, step_in_epoch = epoch + 1, 0
    # data skipped after rollbacks put the data ahead of the steps: the schedules follow the updates taken
    step = epoch * steps_per_epoch + step_in_epoch - progress.get('data_ahead', 0) // g
    start = step_in_epoch * g
    skipped = start - images if epoch == progress['epoch'] else None
    where = (
        f'image {start} of epoch {epoch}'
        + (f' ({skipped} images of its order not trained on in this epoch)' if skipped else ' (the first unseen one)')
        if skipped is not None
        else f'the start of epoch {epoch} (the rest of epoch {progress["epoch"]} is shorter than one new global batch)'
    )
    note = (
        f'global batch {saved.global_batch} -> {g}: resuming at {where}; step {progress["step"]} -> {step} '
        'so that the lr and momentum schedules keep their place in the epochs'
    )
    return {**progress, 'epoch': epoch, 'batch_in_epoch': step_in_epoch * now.grad_accum, 'step': step}, note
