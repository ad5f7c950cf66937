"""Load the DeepSpeed JSON and check it against the YAML config and the world size before anything heavy starts.

The JSON owns ZeRO, precision, loss scaling, batch arithmetic and clipping; the YAML owns the model, the data, the
optimizer and the schedules (docs/pretrain.md, "Two configs"). `validate` never writes into the user's dict: it
returns a `ResolvedBatch` with the numbers the engine needs, and the caller passes the user's JSON to DeepSpeed
unchanged.

Decisions worth knowing:
- "auto" values (a Hugging Face Trainer / Accelerate convention that DeepSpeed itself does not resolve: its
  sections silently drop them and use their defaults) are rejected with a message naming the key: nothing here
  knows what the user meant them to become. The few keys where DeepSpeed gives "auto" a meaning pass.
- Batch keys: any two of train_batch_size, train_micro_batch_size_per_gpu and gradient_accumulation_steps determine
  the third; one alone follows DeepSpeed's own rules (accumulation 1); all three must agree. A split that does not
  divide evenly is an error here, where DeepSpeed would round down and then fail its own assertion.
- Unknown top-level keys are only reported when they look like a typo of a known key (DeepSpeed silently ignores
  unknown top-level keys, so `"gradient_cliping": 1.0` would otherwise mean no clipping). Keys this module does not
  know and that resemble nothing are passed through: DeepSpeed has more sections than the list below.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cmae_ds.config import Config, ConfigError

# Top-level keys of DeepSpeed 0.19 configs (deepspeed/runtime/constants.py and the sections it parses).
KNOWN_TOP_LEVEL = frozenset(
    {
        'train_batch_size',
        'train_micro_batch_size_per_gpu',
        'gradient_accumulation_steps',
        'steps_per_print',
        'wall_clock_breakdown',
        'memory_breakdown',
        'dump_state',
        'gradient_clipping',
        'prescale_gradients',
        'gradient_predivide_factor',
        'gradient_allreduce_op',
        'communication_data_type',
        'seq_parallel_communication_data_type',
        'disable_allgather',
        'disable_python_gc',
        'zero_optimization',
        'zero_allow_untested_optimizer',
        'zero_force_ds_cpu_optimizer',
        'fp16',
        'bf16',
        'bfloat16',
        'torch_autocast',
        'data_types',
        'activation_checkpointing',
        'flops_profiler',
        'tensorboard',
        'wandb',
        'csv_monitor',
        'comet',
        'comms_logger',
        'checkpoint',
        'aio',
        'dataloader_drop_last',
        'optimizer',
        'scheduler',
        'compile',
        'elasticity',
        'autotuning',
        'timers',
        'log_level',
        'pipeline',
        'data_efficiency',
        'curriculum_learning',
        'sparse_attention',
        'hybrid_engine',
        'weight_quantization',
        'nebula',
        'tensor_parallel',
        'expert_parallel',
        'managed_gradient_accumulation',
        'use_data_before_expert_parallelism',
        'compression_training',
        'quantize_training',
        'eigenvalue',
        'progressive_layer_drop',
        'amp',
        'zero_allow_comm_data_type_fp32',
    }
)
KNOWN_ZERO = frozenset(
    {
        'stage',
        'offload_optimizer',
        'offload_param',
        'overlap_comm',
        'contiguous_gradients',
        'reduce_scatter',
        'reduce_bucket_size',
        'allgather_partitions',
        'allgather_bucket_size',
        'round_robin_gradients',
        'sub_group_size',
        'stage3_max_live_parameters',
        'stage3_max_reuse_distance',
        'stage3_prefetch_bucket_size',
        'stage3_param_persistence_threshold',
        'stage3_model_persistence_threshold',
        'stage3_gather_16bit_weights_on_model_save',
        'ignore_unused_parameters',
        'elastic_checkpoint',
        'zero_hpz_partition_size',
        'zero_quantized_weights',
        'zero_quantized_gradients',
        'memory_efficient_linear',
        'load_from_fp32_weights',
        'use_multi_rank_bucket_allreduce',
    }
)
KNOWN_FP16 = frozenset(
    {
        'enabled',
        'auto_cast',
        'loss_scale',
        'initial_scale_power',
        'loss_scale_window',
        'hysteresis',
        'consecutive_hysteresis',
        'min_loss_scale',
        'fp16_master_weights_and_grads',
    }
)
KNOWN_BF16 = frozenset(
    {
        'enabled',
        'immediate_grad_update',
        'check_grad_overflow',
        'bf16_master_weights_and_grads',
        'bf16_optimizer_states',
    }
)

# Sections the project owns through the YAML; a copy in the JSON would fight it.
_OWNED_BY_YAML = {
    'optimizer': 'the optimizer is built from the YAML train section (train.optimizer, train.base_lr, '
    'train.weight_decay, train.betas, with the no-decay parameter groups of docs/spec.md section 8)',
    'scheduler': 'lr and momentum follow cmae_ds.engine.schedules from the YAML (train.warmup_epochs, train.epochs, '
    'train.base_lr, train.min_lr)',
    'activation_checkpointing': 'per-block activation checkpointing is switched by model.activation_checkpointing '
    "in the YAML; DeepSpeed's section has no effect on this model",
    'compile': 'torch.compile is switched by model.compile in the YAML (per transformer block, before DeepSpeed wraps '
    'the model)',
}

_BATCH_KEYS = ('train_batch_size', 'train_micro_batch_size_per_gpu', 'gradient_accumulation_steps')


@dataclass(frozen=True)
class ResolvedBatch:
    """What the engine needs from the JSON, resolved for one world size. The user's JSON is left as written."""

    micro_batch: int
    """Images per rank per forward (train_micro_batch_size_per_gpu)."""
    grad_accum: int
    """Micro-steps per optimizer step (gradient_accumulation_steps)."""
    global_batch: int
    """Images per optimizer step over all ranks (train_batch_size): the batch that scales the lr."""
    precision: str
    """'bf16', 'fp16' or 'fp32'."""
    zero_stage: int
    offload_optimizer: bool
    """True when zero_optimization.offload_optimizer.device is 'cpu' or 'nvme'."""


def compute_dtype(batch: ResolvedBatch):
    """The torch dtype inputs are cast to before the engine's forward."""
    import torch

    return {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(batch.precision, torch.float32)


def load_ds_config(path: str) -> dict:
    """Read a DeepSpeed JSON file; ConfigError naming the file when it is missing, unreadable or not an object."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f'DeepSpeed config {path} not found')
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f'DeepSpeed config {path}: cannot read: {e}') from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            f'DeepSpeed config {path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}'
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f'DeepSpeed config {path}: top level must be a JSON object, got {type(data).__name__}')
    return data


def validate(ds: dict, cfg: Optional[Config], world_size: int, *, path: str) -> ResolvedBatch:
    """Check a DeepSpeed config dict against the project config and the world size; return the resolved numbers.

    `cfg` is the pretraining config (None for fine-tuning and probing, whose model has no batch constraint).
    Raises ConfigError with the offending key and `path` in the message. `ds` is only read.
    """
    if world_size < 1:
        raise ConfigError(f'world size {world_size} must be >= 1 (checking {path})')
    _check_no_auto(ds, path)
    _check_typos(ds, KNOWN_TOP_LEVEL, '', path)
    _check_owned_sections(ds, path)
    micro, accum, global_batch = _resolve_batch(ds, world_size, path)
    precision = resolve_precision(ds, path)
    stage, offload = _resolve_zero(ds, path)
    _check_clipping(ds, path)
    if cfg is not None:
        _check_against_model(cfg, micro, world_size, path)
    return ResolvedBatch(
        micro_batch=micro,
        grad_accum=accum,
        global_batch=global_batch,
        precision=precision,
        zero_stage=stage,
        offload_optimizer=offload,
    )


def check_precision_supported(resolved: ResolvedBatch, path: str, accelerator=None) -> None:
    """Fail before the engine is built when this machine's DeepSpeed accelerator cannot run the JSON's precision
    (DeepSpeed's own error is a bare ValueError from deep inside initialize(), with no file or key)."""
    if resolved.precision == 'fp32':
        return
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    supported = accelerator.is_fp16_supported() if resolved.precision == 'fp16' else accelerator.is_bf16_supported()
    if not supported:
        other = 'a bf16 config (ds_configs/zero2_bf16.json)' if resolved.precision == 'fp16' else 'fp32'
        raise ConfigError(
            f"{path}: {resolved.precision}.enabled is true, but DeepSpeed's "
            f'{accelerator.device_name()} accelerator on this machine does not support '
            f'{resolved.precision}; use {other}'
        )


# Places where DeepSpeed itself gives "auto" a meaning; everywhere else it is rejected.
_AUTO_OK = ('data_types.keep_in_fp32_modules', 'pipeline.stages', 'autotuning.')


def _check_no_auto(node: Any, path: str, prefix: str = '') -> None:
    """Reject "auto": DeepSpeed's own sections silently drop it and use their default (so `"bf16": {"enabled":
    "auto"}` means fp32), and the batch keys fail later with a TypeError. Guessing a value would rewrite the user's
    intent, so the user writes it."""
    if isinstance(node, dict):
        for key, value in node.items():
            _check_no_auto(value, path, f'{prefix}{key}.')
    elif isinstance(node, str) and node.strip().lower() == 'auto':
        key = prefix[:-1]
        if key in _AUTO_OK or key.startswith(_AUTO_OK[-1]):
            return
        raise ConfigError(
            f'{path}: {key} is "auto"; DeepSpeed does not resolve "auto" here (it is a Hugging '
            'Face Trainer convention; DeepSpeed drops it and uses its default): write the value'
        )


def _check_typos(section: dict, known: frozenset, prefix: str, path: str) -> None:
    for key in section:
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        if close:
            # DeepSpeed forbids unknown keys inside its sections but ignores them at the top level.
            effect = ' (DeepSpeed would ignore it silently)' if not prefix else ''
            raise ConfigError(f'{path}: unknown key {prefix}{key!r}; did you mean {prefix}{close[0]!r}?{effect}')


def _check_owned_sections(ds: dict, path: str) -> None:
    for key, why in _OWNED_BY_YAML.items():
        if key in ds:
            raise ConfigError(f'{path}: remove the "{key}" section: {why}')


def _positive_int(ds: dict, key: str, path: str) -> Optional[int]:
    value = ds.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f'{path}: {key} must be a positive integer, got {value!r}')
    return value


def _resolve_batch(ds: dict, world: int, path: str) -> tuple[int, int, int]:
    """(micro, accum, global) from any two of the three keys, or one as DeepSpeed does; never written back."""
    tb, mb, ga = (_positive_int(ds, k, path) for k in _BATCH_KEYS)
    if tb is None and mb is None:
        raise ConfigError(
            f'{path}: set train_micro_batch_size_per_gpu (and gradient_accumulation_steps), or train_batch_size'
        )
    if mb is None:
        ga = ga or 1
        mb = _exact_div(
            tb,
            world * ga,
            path,
            f'train_batch_size {tb} is not divisible by world size {world} x gradient_accumulation_steps {ga}',
        )
    elif ga is None:
        if tb is None:
            ga = 1
        else:
            ga = _exact_div(
                tb,
                world * mb,
                path,
                f'train_batch_size {tb} is not divisible by train_micro_batch_size_per_gpu {mb} x world size {world}',
            )
    derived = mb * ga * world
    if tb is not None and tb != derived:
        raise ConfigError(
            f'{path}: train_batch_size {tb} != train_micro_batch_size_per_gpu {mb} x '
            f'gradient_accumulation_steps {ga} x world size {world} = {derived}; remove '
            'train_batch_size to derive it, or fix one of the three'
        )
    return mb, ga, derived


def _exact_div(num: int, den: int, path: str, message: str) -> int:
    if num % den:
        raise ConfigError(f'{path}: {message}')
    return num // den


def _enabled(ds: dict, key: str, path: str) -> bool:
    section = ds.get(key)
    if section is None:
        return False
    if not isinstance(section, dict):
        raise ConfigError(f'{path}: {key} must be an object like {{"enabled": true}}, got {section!r}')
    known = KNOWN_FP16 if key == 'fp16' else KNOWN_BF16
    _check_typos(section, known, f'{key}.', path)
    enabled = section.get('enabled', False)
    if not isinstance(enabled, bool):
        raise ConfigError(f'{path}: {key}.enabled must be true or false, got {enabled!r}')
    return enabled


def resolve_precision(ds: dict, path: str) -> str:
    """'bf16', 'fp16' or 'fp32' from a DeepSpeed config (also the one a checkpoint carries)."""
    if 'bf16' in ds and 'bfloat16' in ds:
        raise ConfigError(f'{path}: both "bf16" and its old name "bfloat16" are present; keep only "bf16"')
    if 'amp' in ds:
        raise ConfigError(
            f'{path}: remove the "amp" section (NVIDIA Apex AMP is gone from DeepSpeed); use "bf16" or "fp16"'
        )
    bf16 = _enabled(ds, 'bf16' if 'bf16' in ds else 'bfloat16', path)
    fp16 = _enabled(ds, 'fp16', path)
    if bf16 and fp16:
        raise ConfigError(f'{path}: bf16.enabled and fp16.enabled are both true; enable one of them')
    return 'bf16' if bf16 else 'fp16' if fp16 else 'fp32'


def _offload_device(zero: dict, key: str, path: str) -> Optional[str]:
    section = zero.get(key)
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f'{path}: zero_optimization.{key} must be an object like {{"device": "cpu"}}')
    device = section.get('device', 'none')
    if device not in ('none', 'cpu', 'nvme'):
        raise ConfigError(f'{path}: zero_optimization.{key}.device {device!r} must be "cpu", "nvme" or "none"')
    return None if device == 'none' else device


def _resolve_zero(ds: dict, path: str) -> tuple[int, bool]:
    zero = ds.get('zero_optimization', {})
    if not isinstance(zero, dict):
        raise ConfigError(f'{path}: zero_optimization must be an object like {{"stage": 2}}')
    _check_typos(zero, KNOWN_ZERO, 'zero_optimization.', path)
    stage = zero.get('stage', 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise ConfigError(f'{path}: zero_optimization.stage {stage!r} is not a ZeRO stage (0, 1, 2 or 3)')
    opt_dev = _offload_device(zero, 'offload_optimizer', path)
    param_dev = _offload_device(zero, 'offload_param', path)
    if opt_dev and stage == 0:
        raise ConfigError(
            f'{path}: zero_optimization.offload_optimizer needs ZeRO stage 1, 2 or 3, but zero_optimization.stage is 0'
        )
    if opt_dev == 'nvme' and stage != 3:
        raise ConfigError(
            f'{path}: zero_optimization.offload_optimizer.device "nvme" needs ZeRO stage 3 '
            f'(ZeRO-Infinity), but zero_optimization.stage is {stage}'
        )
    if param_dev and stage != 3:
        raise ConfigError(
            f'{path}: zero_optimization.offload_param needs ZeRO stage 3 (only stage 3 partitions '
            f'parameters), but zero_optimization.stage is {stage}'
        )
    return stage, opt_dev is not None


def _check_clipping(ds: dict, path: str) -> None:
    clip = ds.get('gradient_clipping', 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise ConfigError(f'{path}: gradient_clipping must be a number >= 0 (0 = no clipping), got {clip!r}')


def _check_against_model(cfg: Config, micro: int, world: int, path: str) -> None:
    # The projector's BatchNorm runs in training mode on the (synced) batch: one sample has no variance.
    if cfg.model.mode == 'cmae' and micro * world < 2:
        raise ConfigError(
            f"{path}: train_micro_batch_size_per_gpu {micro} x world size {world} < 2; CMAE's "
            'projector BatchNorm needs at least 2 samples per step'
        )
