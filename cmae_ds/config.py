"""Typed configuration: model sizes, model, data and training settings, YAML presets and overrides.

DeepSpeed's JSON owns ZeRO, precision, batch arithmetic and clipping; these dataclasses own everything else.
`cmae_ds.ds_config.validate` checks the two against each other before anything heavy starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
import typing
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""


@dataclass(frozen=True)
class EncoderSize:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    patch_size: int


# Spec section 3. `debug` is small enough to train for a few steps on a CPU in a test.
ENCODER_SIZES: dict[str, EncoderSize] = {
    'debug': EncoderSize(embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0, patch_size=16),
    'vit_small': EncoderSize(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, patch_size=16),
    'vit_base': EncoderSize(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, patch_size=16),
    'vit_large': EncoderSize(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, patch_size=16),
    'vit_huge': EncoderSize(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0, patch_size=14),
    'vit_giant': EncoderSize(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=6144 / 1408, patch_size=14),
}

# Decoder and projector widths that go with the small debug encoder; every other size uses the official ones.
_DEBUG_HEADS = dict(decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4, feature_decoder_depth=1,
                    proj_hidden_dim=128, proj_dim=32)


def _check_fields(cls, data: dict, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f'{where}: unknown key(s) {unknown}; known keys: {sorted(known)}')


def _coerce(cls, data: dict, where: str) -> dict:
    """Check each value against its field's type. YAML reads `1e30` as a string (1.1 wants `1.0e30`), so numeric
    strings become numbers; anything else of the wrong type is an error naming the key."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in data.items():
        kind = hints[key]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            if value is None:
                out[key] = None
                continue
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        out[key] = _coerce_value(kind, value, f'{where}.{key}')
    return out


def _coerce_value(kind, value, name: str):
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind in (int, float):
        if isinstance(value, bool):
            pass
        elif isinstance(value, (int, float)) and (kind is float or float(value).is_integer()):
            return kind(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if kind is float or number.is_integer():
                    return kind(number)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(kind) is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(_coerce_value(a, v, name) for a, v in zip(typing.get_args(kind), value))
    else:
        return value
    raise ConfigError(f'{name}: {value!r} is not a valid {getattr(kind, "__name__", kind)}')


@dataclass
class ModelConfig:
    """The model. Fields left at None are filled from `size` (and `mode`) in __post_init__."""

    size: str = 'vit_base'
    """Named encoder size: one of ENCODER_SIZES. Explicit fields below override it."""
    mode: str = 'cmae'
    """'cmae' (online + target branch, block masking) or 'mae' (pixel branch only, per-patch masking)."""
    img_size: int = 224
    in_chans: int = 3
    patch_size: Optional[int] = None
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    decoder_embed_dim: Optional[int] = None
    """Width of both decoders (official: 512)."""
    decoder_depth: Optional[int] = None
    """Pixel decoder depth (official: 8)."""
    decoder_num_heads: Optional[int] = None
    feature_decoder_depth: Optional[int] = None
    """Feature decoder depth (official: 2)."""
    proj_hidden_dim: Optional[int] = None
    proj_dim: Optional[int] = None
    mask_ratio: Optional[float] = None
    """CMAE: fraction of 2x2 blocks hidden (official 0.65). MAE: fraction of patches hidden (0.75)."""
    temperature: float = 0.07
    loss_con_weight: float = 1.0
    loss_rec_weight: float = 1.0
    drop_path: float = 0.0
    activation_checkpointing: bool = False
    """Recompute each transformer block in backward instead of storing its activations."""

    def __post_init__(self) -> None:
        if self.size not in ENCODER_SIZES:
            raise ConfigError(f'model.size: {self.size!r} is not one of {list(ENCODER_SIZES)}')
        if self.mode not in ('cmae', 'mae'):
            raise ConfigError(f"model.mode: {self.mode!r} must be 'cmae' or 'mae'")
        enc = ENCODER_SIZES[self.size]
        heads = _DEBUG_HEADS if self.size == 'debug' else dict(
            decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, feature_decoder_depth=2,
            proj_hidden_dim=1536, proj_dim=256)
        defaults = {**dataclasses.asdict(enc), **heads,
                    'mask_ratio': 0.65 if self.mode == 'cmae' else 0.75}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self._validate()

    def _validate(self) -> None:
        if self.img_size % self.patch_size:
            raise ConfigError(f'model.img_size {self.img_size} is not a multiple of patch_size {self.patch_size}')
        if self.mode == 'cmae' and self.grid_size % 2:
            raise ConfigError(f'model: block masking needs an even patch grid, got {self.grid_size} '
                              f'(img_size {self.img_size} / patch_size {self.patch_size})')
        for name, width, heads in (('embed_dim', self.embed_dim, self.num_heads),
                                   ('decoder_embed_dim', self.decoder_embed_dim, self.decoder_num_heads)):
            if width % heads:
                raise ConfigError(f'model.{name} {width} is not divisible by its number of heads {heads}')
            if width % 4:
                raise ConfigError(f'model.{name} {width} must be a multiple of 4 (2-D sin-cos embedding)')
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f'model.mask_ratio {self.mask_ratio} must lie in (0, 1)')
        if self.num_visible == 0:
            raise ConfigError(f'model.mask_ratio {self.mask_ratio} leaves no visible patch')
        if self.temperature <= 0:
            raise ConfigError(f'model.temperature {self.temperature} must be positive')
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f'model.drop_path {self.drop_path} must lie in [0, 1)')

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def num_visible(self) -> int:
        """Visible patches per sample; the same for every sample (spec section 2)."""
        if self.mode == 'cmae':
            num_blocks = (self.grid_size // 2) ** 2
            return 4 * int(num_blocks * (1 - self.mask_ratio))
        return int(self.num_patches * (1 - self.mask_ratio))

    @classmethod
    def from_dict(cls, data: dict, where: str = 'model') -> 'ModelConfig':
        _check_fields(cls, data, where)
        return cls(**_coerce(cls, data, where))


@dataclass
class DataConfig:
    """Where the images come from and how they are turned into batches."""

    source: str = 'embedded'
    """'embedded' (photos shipped with the package), 'folder' (ImageNet-style), 'json' (official annotation
    file), 'filelist' (one path per line, optionally followed by a label), or 'synthetic'."""
    root: str = ''
    """Image folder; for 'json' and 'filelist', the folder that relative paths in `ann_file` start from."""
    ann_file: str = ''
    """The official JSON annotation file or the file list, for those sources."""
    pipeline: str = 'auto'
    """'auto' (DALI when importable, else torch_gpu on a CUDA device, else torch), 'dali', 'torch_gpu' (JPEGs decoded
    and views made on the device by torch ops) or 'torch' (PIL in DataLoader workers)."""
    num_workers: int = -1
    """DataLoader workers (torch pipelines) or DALI CPU threads per rank; -1: sized to the cores this rank owns
    (cmae_ds/data/threads.py)."""
    master_extra: int = 32
    """The master crop is view + this many pixels (spec section 7: 256 for 224 views)."""
    hw_decoder_load: float = 0.65
    """DALI on a GPU: share of JPEG decoding sent to the hardware decoder (A100/H100 nvJPEG engine)."""

    def __post_init__(self) -> None:
        if self.source not in ('embedded', 'folder', 'json', 'filelist', 'synthetic'):
            raise ConfigError(f'data.source: {self.source!r} is not one of embedded, folder, json, filelist, '
                              'synthetic')
        if self.pipeline not in ('auto', 'dali', 'torch_gpu', 'torch'):
            raise ConfigError(f"data.pipeline: {self.pipeline!r} must be 'auto', 'dali', 'torch_gpu' or 'torch'")
        if self.source in ('folder',) and not self.root:
            raise ConfigError("data.root must be set for data.source 'folder'")
        if self.source in ('json', 'filelist') and not self.ann_file:
            raise ConfigError(f"data.ann_file must be set for data.source {self.source!r}")
        if self.num_workers < -1:
            raise ConfigError(f'data.num_workers {self.num_workers} must be >= 0, or -1 (sized to the cores)')
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ConfigError(f'data.hw_decoder_load {self.hw_decoder_load} must lie in [0, 1]')


@dataclass
class TrainConfig:
    """Optimization, schedules, checkpoints and logging. Batch sizes and precision live in the DeepSpeed JSON."""

    epochs: int = 300
    warmup_epochs: int = 40
    base_lr: float = 1.5e-4
    """Learning rate per 256 images of global batch (spec section 8)."""
    warmup_start_factor: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    momentum_base: float = 0.996
    momentum_end: float = 0.996
    optimizer: str = 'auto'
    """'auto' picks a fused AdamW for the device; see cmae_ds.optim."""
    max_steps: int = 0
    """Stop after this many optimizer steps of this invocation (a resumed run takes that many more; 0: run all
    epochs). Schedules still span all epochs."""
    seed: int = 0
    output_dir: str = 'runs/cmae'
    save_every_steps: int = 1000
    keep_last: int = 3
    log_every_steps: int = 10
    image_every_steps: int = 500
    progress_bar: bool = True

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.epochs <= 0:
            raise ConfigError(f'train.epochs {self.epochs} must be positive')
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(f'train.warmup_epochs {self.warmup_epochs} must lie in [0, train.epochs]')
        for name in ('momentum_base', 'momentum_end'):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f'train.{name} {getattr(self, name)} must lie in [0, 1]')
        for name in ('save_every_steps', 'log_every_steps', 'image_every_steps', 'keep_last'):
            if getattr(self, name) < 0:
                raise ConfigError(f'train.{name} must be >= 0')


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    knn: 'KnnConfig' = field(default_factory=lambda: KnnConfig())
    """kNN monitor during pretraining: on when knn.every_steps > 0, on the labeled knn_train / knn_val sets."""
    knn_train: DataConfig = field(default_factory=DataConfig)
    knn_val: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {'model': ModelConfig, 'data': DataConfig, 'train': TrainConfig}  # knn sections added below KnnConfig


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(raw: dict, overrides: list[str], sections: Optional[dict] = None) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML) to a raw config dict."""
    sections = _SECTIONS if sections is None else sections
    raw = {k: dict(v or {}) if isinstance(v, dict) or v is None else v for k, v in raw.items()}
    for item in overrides:
        if '=' not in item or '.' not in item.split('=', 1)[0]:
            raise ConfigError(f'override {item!r} must look like section.key=value, e.g. train.epochs=800')
        key, value = item.split('=', 1)
        section, name = key.split('.', 1)
        if section not in sections:
            raise ConfigError(f'override {item!r}: unknown section {section!r}; sections: {list(sections)}')
        raw.setdefault(section, {})[name] = _parse_value(value)
    return raw


def build_sections(raw: dict, sections: dict, where: str) -> dict:
    """Each section's dataclass from the raw dict; unknown sections and keys and wrong types name themselves."""
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f'{where}: unknown section(s) {unknown}; sections: {list(sections)}')
    parts = {}
    for name, cls in sections.items():
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f'{where}: section {name!r} must be a mapping')
        _check_fields(cls, section, f'{where}: {name}')
        try:
            parts[name] = cls(**_coerce(cls, section, name))
        except TypeError as e:
            raise ConfigError(f'{where}: {name}: {e}') from None
    return parts


def build_config(raw: dict, where: str = 'config') -> Config:
    return Config(**build_sections(raw, _SECTIONS, where))


PRESET_DIR = Path(__file__).parent / 'presets'


def read_yaml(path: str) -> tuple[dict, str]:
    """A YAML file, or a preset name from cmae_ds/presets -> (raw sections, where it came from)."""
    p = Path(path)
    if not p.exists() and (PRESET_DIR / f'{path}.yaml').exists():
        p = PRESET_DIR / f'{path}.yaml'
    if not p.exists():
        presets = sorted(q.stem for q in PRESET_DIR.glob('*.yaml'))
        raise ConfigError(f'config file {path} not found (presets: {presets})')
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f'{p}: not valid YAML: {e}') from None
    if not isinstance(raw, dict):
        raise ConfigError(f'{p}: top level must be a mapping of sections')
    return raw, str(p)


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML file (or a preset name from cmae_ds/presets) and apply command-line overrides."""
    raw, where = read_yaml(path) if path else ({}, 'defaults')
    return build_config(apply_overrides(raw, overrides or []), where)


# --- Fine-tuning, linear probing and kNN (spec section 9) ------------------------------------------------------
# Their YAML files have the sections model (the encoder's architecture), data (training images), val_data
# (validation images) and one task section: finetune, linprobe or knn. See docs/finetune.md.


@dataclass
class ClassifierTrainConfig:
    """Fields shared by fine-tuning and linear probing. Batch sizes and precision live in the DeepSpeed JSON."""

    pretrained: str = ''
    """Starting weights: our pretraining run's model.pt (or its run folder), an extracted encoder, an official
    pretraining checkpoint or an official extracted backbone."""
    num_classes: int = 1000
    epochs: int = 100
    warmup_epochs: int = 5
    base_lr: float = 5e-4
    """Learning rate per 256 images of global batch: lr = base_lr x global_batch / 256."""
    warmup_start_factor: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    img_size: Optional[int] = None
    """Training and evaluation resolution; None: model.img_size. The position embedding is interpolated."""
    eval_every_epochs: int = 1
    eval_batch_size: int = 0
    """Images per rank per evaluation forward; 0: the JSON's train_micro_batch_size_per_gpu."""
    max_steps: int = 0
    """Stop after this many optimizer steps of this invocation (a resumed run takes that many more; 0: run all
    epochs). Schedules still span all epochs."""
    seed: int = 0
    output_dir: str = 'runs/finetune'
    save_every_steps: int = 0
    """Resumable checkpoints between epoch ends (0: only at each epoch's end, after its evaluation)."""
    keep_last: int = 1
    log_every_steps: int = 10
    progress_bar: bool = True

    def __post_init__(self) -> None:
        where = type(self).section
        if self.num_classes < 1:
            raise ConfigError(f'{where}.num_classes {self.num_classes} must be >= 1')
        if self.epochs <= 0:
            raise ConfigError(f'{where}.epochs {self.epochs} must be positive')
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(f'{where}.warmup_epochs {self.warmup_epochs} must lie in [0, {where}.epochs]')
        if self.img_size is not None and self.img_size <= 0:
            raise ConfigError(f'{where}.img_size {self.img_size} must be positive')
        for name in ('eval_every_epochs', 'eval_batch_size', 'max_steps', 'save_every_steps', 'keep_last',
                     'log_every_steps'):
            if getattr(self, name) < 0:
                raise ConfigError(f'{where}.{name} must be >= 0')

    section = 'classifier'


@dataclass
class FinetuneConfig(ClassifierTrainConfig):
    """The official fine-tuning recipe (spec section 9): AdamW, layer-wise lr decay, mixup/cutmix, drop path."""

    layer_decay: float = 0.65
    """lr scale of layer l (0: embeddings, i + 1: block i, depth + 1: fc_norm and head) is
    layer_decay ** (depth + 1 - l)."""
    betas: tuple[float, float] = (0.9, 0.999)
    drop_path: float = 0.1
    smoothing: float = 0.1
    mixup: float = 0.8
    """Mixup alpha (0: off)."""
    cutmix: float = 1.0
    """CutMix alpha (0: off)."""
    mixup_prob: float = 1.0
    """Probability that a batch is mixed at all."""
    mixup_switch_prob: float = 0.5
    """Probability of CutMix instead of mixup when both are on."""
    optimizer: str = 'auto'
    """AdamW backend, as train.optimizer for pretraining."""

    section = 'finetune'

    def __post_init__(self) -> None:
        super().__post_init__()
        self.betas = tuple(self.betas)
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f'finetune.layer_decay {self.layer_decay} must lie in (0, 1]')
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f'finetune.drop_path {self.drop_path} must lie in [0, 1)')
        if not 0.0 <= self.smoothing < 1.0:
            raise ConfigError(f'finetune.smoothing {self.smoothing} must lie in [0, 1)')
        for name in ('mixup', 'cutmix'):
            if getattr(self, name) < 0:
                raise ConfigError(f'finetune.{name} {getattr(self, name)} must be >= 0 (0: off)')
        for name in ('mixup_prob', 'mixup_switch_prob'):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f'finetune.{name} {getattr(self, name)} must lie in [0, 1]')

    @property
    def mixes(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


@dataclass
class LinearProbeConfig(ClassifierTrainConfig):
    """MAE's linear probing protocol: frozen encoder, BatchNorm1d(affine=False) + Linear, LARS, 90 epochs."""

    epochs: int = 90
    warmup_epochs: int = 10
    base_lr: float = 0.1
    """MAE: blr 0.1 at batch 16384 -> lr 6.4."""
    warmup_start_factor: float = 0.0
    """MAE's warmup starts from 0."""
    min_lr: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = 'lars'
    """'lars' (MAE's LARS: momentum 0.9, trust coefficient 0.001, matrices only) or 'sgd' (momentum 0.9)."""
    momentum: float = 0.9
    pool: str = 'cls'
    """Feature fed to the probe: 'cls' (MAE's default: cls token after the final norm) or 'mean' (mean of the
    patch tokens after the final norm)."""
    output_dir: str = 'runs/linprobe'

    section = 'linprobe'

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.optimizer not in ('lars', 'sgd'):
            raise ConfigError(f"linprobe.optimizer {self.optimizer!r} must be 'lars' or 'sgd'")
        if self.pool not in ('cls', 'mean'):
            raise ConfigError(f"linprobe.pool {self.pool!r} must be 'cls' or 'mean'")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f'linprobe.momentum {self.momentum} must lie in [0, 1)')


@dataclass
class KnnConfig:
    """Weighted kNN on frozen features (DINO's protocol): k nearest training images by cosine similarity vote
    with weight exp(similarity / temperature). Stand-alone (launch/knn.py) or as a pretraining monitor."""

    k: int = 20
    temperature: float = 0.07
    num_classes: int = 0
    """0: one more than the largest training label."""
    batch_size: int = 64
    """Images per rank per feature-extraction forward."""
    every_steps: int = 0
    """Pretraining monitor: run every this many optimizer steps (0: off)."""
    pretrained: str = ''
    """Stand-alone: the checkpoint whose online encoder is evaluated (any source load_encoder understands)."""
    output_dir: str = 'runs/knn'

    section = 'knn'

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f'knn.k {self.k} must be >= 1')
        if self.temperature <= 0:
            raise ConfigError(f'knn.temperature {self.temperature} must be positive')
        for name in ('num_classes', 'every_steps'):
            if getattr(self, name) < 0:
                raise ConfigError(f'knn.{name} must be >= 0')
        if self.batch_size < 1:
            raise ConfigError(f'knn.batch_size {self.batch_size} must be >= 1')


@dataclass
class TaskConfig:
    """A fine-tuning, linear-probing or kNN run: model, training data, validation data and the task section."""

    model: ModelConfig
    data: DataConfig
    val_data: DataConfig
    task: Any
    """FinetuneConfig, LinearProbeConfig or KnnConfig."""

    def to_dict(self) -> dict:
        return {'model': dataclasses.asdict(self.model), 'data': dataclasses.asdict(self.data),
                'val_data': dataclasses.asdict(self.val_data), self.task.section: dataclasses.asdict(self.task)}


TASKS = {'finetune': FinetuneConfig, 'linprobe': LinearProbeConfig, 'knn': KnnConfig}


def _task_sections(task: str) -> dict:
    return {'model': ModelConfig, 'data': DataConfig, 'val_data': DataConfig, task: TASKS[task]}


def load_task_config(task: str, path: Optional[str] = None, overrides: Optional[list[str]] = None) -> TaskConfig:
    """Load a fine-tuning ('finetune'), linear-probing ('linprobe') or kNN ('knn') YAML file or preset, then apply
    `section.key=value` overrides. Sections: model, data, val_data and the task's own."""
    if task not in TASKS:
        raise ConfigError(f'unknown task {task!r}; tasks: {list(TASKS)}')
    sections = _task_sections(task)
    raw, where = read_yaml(path) if path else ({}, 'defaults')
    parts = build_sections(apply_overrides(raw, overrides or [], sections), sections, where)
    return TaskConfig(parts['model'], parts['data'], parts['val_data'], parts[task])


def load_finetune_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> TaskConfig:
    return load_task_config('finetune', path, overrides)


_SECTIONS.update(knn=KnnConfig, knn_train=DataConfig, knn_val=DataConfig)
