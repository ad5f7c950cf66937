"""The ZeRO-0 side of a resume on another ZeRO stage (engine/checkpoints/elastic.py, docs/resume.md).

DeepSpeed's universal checkpoint format is written from, and read into, ZeRO 1-3 optimizers only. This module
writes the universal folder from a ZeRO-0 checkpoint and reads one into a ZeRO-0 engine, so that a run moves
between ZeRO-0 and ZeRO 1-3 (any number of ranks) like between two ZeRO stages.

A ZeRO-0 engine keeps its optimizer in one of three forms (DeepSpeed 0.19):
- fp32: the torch optimizer over the module's own parameters;
- bf16/fp16 with a non-fused optimizer (FP16_UnfusedOptimizer, the CPU case): over an fp32 copy of each parameter;
- bf16/fp16 with DeepSpeed's FusedAdam (FP16_Optimizer, the GPU case): over one flat fp32 tensor per group.
Its checkpoint holds that optimizer's state_dict (the wrappers nest the torch one under 'optimizer_state_dict'
beside their fp32 copies, 'fp32_groups' or 'fp32_groups_flat'), indexed by position rather than by name: every
ZeRO-0 checkpoint also carries its optimizer's parameter names (`optimizer_param_names`), and the sizes are checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import torch

from ...config import ConfigError
from ...modelfiles.safe_load import load_checkpoint_file, scan_folder

NAMES = 'optimizer_param_names'
MODEL_STATES = 'mp_rank_00_model_states.pt'  # DeepSpeed's name for the (ZeRO 0-2) model states file
MOMENTS = ('exp_avg', 'exp_avg_sq')
# What DeepSpeed's loader keeps for itself out of a model states file; the rest is the client state.
DEEPSPEED_KEYS = (
    'module',
    'skipped_steps',
    'global_steps',
    'dp_world_size',
    'mp_world_size',
    'data_sampler',
    'random_ltd',
)


def lp_groups(engine) -> list[list[torch.nn.Parameter]]:
    """The module's trained parameters, per optimizer group, in the optimizer's order (ZeRO-0 engines)."""
    optimizer = engine.optimizer
    groups = getattr(optimizer, 'fp16_groups', None)
    return list(groups) if groups is not None else [list(g['params']) for g in optimizer.param_groups]


def param_names(engine) -> list[list[str]]:
    by_id = {id(p): name for name, p in engine.module.named_parameters()}
    return [[by_id[id(p)] for p in group] for group in lp_groups(engine)]


def names_entry(engine) -> dict:
    """What a ZeRO-0 checkpoint's client state carries so that it can be converted without the run."""
    return {NAMES: param_names(engine)} if int(engine.zero_optimization_stage()) == 0 else {}


# --- ZeRO-0 checkpoint -> universal folder ----------------------------------------------------------------------


def is_zero0(states: dict) -> bool:
    """Whether a DeepSpeed model states file holds the whole optimizer state (ZeRO-0)."""
    return states.get('optimizer') is not None


def saved_form(optimizer_state: dict) -> str:
    """'flat' (FP16_Optimizer), 'copies' (FP16_UnfusedOptimizer) or 'plain' (fp32): which form wrote the state."""
    return (
        'flat' if 'fp32_groups_flat' in optimizer_state else 'copies' if 'fp32_groups' in optimizer_state else 'plain'
    )


def live_form(engine) -> str:
    optimizer = engine.optimizer
    return (
        'flat' if hasattr(optimizer, 'fp32_groups_flat') else 'copies' if hasattr(optimizer, 'fp32_groups') else 'plain'
    )


def write_universal(states: dict, where: Path, dst: Path) -> None:
    """The universal folder `dst` (zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt, zero/optimizer_state.pt and the
    model states without the optimizer) from the model states file of a ZeRO-0 checkpoint at `where`."""
    names = states.get(NAMES)
    if names is None:
        raise ConfigError(
            f'{where}: this ZeRO-0 checkpoint was written before cmae_ds saved the parameter names that moving it to '
            'another layout needs; resume it on ZeRO-0 and save once (any number of ranks), then move that checkpoint'
        )
    zero = dst / 'zero'
    zero.mkdir(parents=True)
    saved = states['optimizer']
    inner = saved.get('optimizer_state_dict', saved)
    for name, tensors in per_param_state(saved, states['module'], names, where):
        folder = zero / name
        folder.mkdir()
        for key, tensor in tensors.items():
            torch.save(tensor if key == 'step' else {'cat_dim': 0, 'param': tensor}, folder / f'{key}.pt')
    global_state = {'param_groups': inner['param_groups'], 'ds_version': states.get('ds_version')}
    torch.save(global_state, zero / 'optimizer_state.pt')
    torch.save({**states, 'optimizer': None}, dst / MODEL_STATES)


def per_param_state(saved: dict, module: dict, names: list[list[str]], where: Path) -> Iterator[tuple[str, dict]]:
    """(name, {'fp32', 'exp_avg', 'exp_avg_sq', 'step'}) for each parameter, from a ZeRO-0 optimizer state_dict in
    any of its forms; one parameter at a time, so that converting a large model does not hold a second copy of it
    (a memory-mapped checkpoint's tensors are read as they are copied)."""
    inner = saved.get('optimizer_state_dict', saved)
    groups = inner['param_groups']
    if len(groups) != len(names):
        raise ConfigError(f'{where}: the optimizer has {len(groups)} parameter groups, the run {len(names)}')
    for i, (group, group_names) in enumerate(zip(groups, names)):
        shapes = [_shape(module, name, where) for name in group_names]
        states = [inner['state'].get(index, {}) for index in group['params']]
        step = _group_step(states, group, where)
        if 'fp32_groups_flat' in saved:  # one flat fp32 tensor per group and its moments
            flats = {'fp32': saved['fp32_groups_flat'][i], **{k: _moment(states[0], k, where) for k in MOMENTS}}
            _check_sizes(flats['fp32'].numel(), sum(s.numel() for s in shapes), f'group {i}', where)
            pieces = {k: _split(v, shapes) for k, v in flats.items()}
            per = [{k: pieces[k][j] for k in pieces} for j in range(len(shapes))]
        else:
            _check_sizes(len(group['params']), len(group_names), f'group {i} (parameters)', where)
            fp32 = saved['fp32_groups'][i] if 'fp32_groups' in saved else [module[n] for n in group_names]
            per = [
                {'fp32': fp32[j].reshape(shapes[j]), **{k: _moment(states[j], k, where, shapes[j]) for k in MOMENTS}}
                for j in range(len(shapes))
            ]
        for name, shape, tensors in zip(group_names, shapes, per):
            _check_sizes(tensors['fp32'].numel(), shape.numel(), name, where)
            # clone: a slice of a flat group would be saved with the whole group's storage
            yield name, {k: v.float().reshape(shape).clone() for k, v in tensors.items()} | {'step': step}


def _shape(module: dict, name: str, where: Path) -> torch.Size:
    if name not in module:
        raise ConfigError(f'{where}: the optimizer names {name}, which the saved module does not hold')
    return module[name].shape


def _group_step(states: list[dict], group: dict, where: Path) -> torch.Tensor:
    """One step count per group: ZeRO 1-3 keep one per flat group, and parameters without state (never given a
    gradient) take their group's."""
    steps = [float(s['step']) for s in states if 'step' in s] or ([float(group['step'])] if 'step' in group else [])
    if not steps:
        raise ConfigError(f'{where}: the saved optimizer state has no step count (not an Adam optimizer?)')
    return torch.tensor(max(steps))


def _moment(state: dict, key: str, where: Path, shape: Optional[torch.Size] = None) -> torch.Tensor:
    if key in state:
        return state[key]
    if not state and shape is not None:  # Adam has not stepped this parameter: its moments are zero
        return torch.zeros(shape)
    raise ConfigError(f"{where}: the saved optimizer state has no '{key}' (only Adam's state converts)")


def _split(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    return [t.reshape(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes)]


def _check_sizes(saved: int, expected: int, what: str, where: Path) -> None:
    if saved != expected:
        raise ConfigError(f'{where}: {what} holds {saved} values in the saved optimizer state, the model {expected}')


# --- universal folder -> ZeRO-0 engine --------------------------------------------------------------------------


def _slots(engine) -> list[tuple[torch.Tensor, list[tuple[str, torch.nn.Parameter, int]]]]:
    """(tensor the torch optimizer keys its state by, [(name, module parameter, offset in that tensor)])."""
    optimizer, names = engine.optimizer, param_names(engine)
    lp = lp_groups(engine)
    if hasattr(optimizer, 'fp32_groups_flat'):
        out = []
        for flat, group, group_names in zip(optimizer.fp32_groups_flat, lp, names):
            offsets = [0]
            for p in group[:-1]:
                offsets.append(offsets[-1] + p.numel())
            out.append((flat, list(zip(group_names, group, offsets))))
        return out
    masters = getattr(optimizer, 'fp32_groups', lp)  # fp32 runs: the parameters are their own masters
    return [
        (master, [(name, p, 0)])
        for masters_g, group, group_names in zip(masters, lp, names)
        for master, p, name in zip(masters_g, group, group_names)
    ]


def load_universal(engine, folder: Path, states: dict, trust: bool = False) -> dict:
    """Load the universal folder's weights and Adam state into a ZeRO-0 engine, and DeepSpeed's step counters from
    its model states `states`; returns the client state. The module state outside the optimizer is the caller's.
    (DeepSpeed's own loader cannot be used: in universal mode it calls a ZeRO optimizer's method on any optimizer,
    and otherwise it reads the module from the model states, which ZeRO-3 saves as empty shards.)"""
    scan_folder(folder, trust=trust)
    engine.global_steps = states['global_steps']
    engine.global_samples = states.get('global_samples', engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = states.get('skipped_steps', 0)
    base = getattr(engine.optimizer, 'optimizer', engine.optimizer)
    owner_group = {id(p): g for g in base.param_groups for p in g['params']}
    with torch.no_grad():
        for owner, members in _slots(engine):
            state = {key: torch.zeros_like(owner) for key in MOMENTS}
            for name, param, offset in members:
                files = _read_param(folder / 'zero' / name, param.numel(), trust)
                owner.view(-1)[offset : offset + param.numel()].copy_(files['fp32'])
                if param is not owner:
                    param.data.copy_(files['fp32'].view_as(param))
                for key in MOMENTS:
                    state[key].view(-1)[offset : offset + param.numel()].copy_(files[key])
            state['step'] = _step_value(base, owner_group[id(owner)], files['step'], owner)
            base.state[owner] = state
    return {key: value for key, value in states.items() if key not in DEEPSPEED_KEYS}


def _read_param(folder: Path, numel: int, trust: bool) -> dict:
    if not folder.is_dir():
        raise ConfigError(f'{folder.parent.parent}: the universal checkpoint has no state for {folder.name}')
    out = {}
    for key in ('fp32', *MOMENTS):
        loaded = load_checkpoint_file(folder / f'{key}.pt', trust=trust)
        tensor = loaded['param'] if isinstance(loaded, dict) else loaded
        if tensor.numel() != numel:
            raise ConfigError(f'{folder / key}.pt: {tensor.numel()} values, the model has {numel}')
        out[key] = tensor.reshape(-1).float()
    out['step'] = float(load_checkpoint_file(folder / 'step.pt', trust=trust))
    return out


def _step_value(optimizer, group: dict, step: float, owner: torch.Tensor):
    """The step count in the optimizer's own form: torch's Adam keeps a tensor (on the parameter's device when
    fused or capturable), DeepSpeed's FusedAdam a Python int that it hands to its kernel."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        on_device = group.get('fused') or group.get('capturable')
        return torch.tensor(step, dtype=torch.float32, device=owner.device if on_device else 'cpu')
    return int(step)
