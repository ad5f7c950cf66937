"""The sections of a pretraining config: model, data, train, kernels, and the kNN monitor. Each field's range or
choices are declared on the field and checked with every other section's (`check_declared`); relations between
fields are checked in `__post_init__`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from .fields import ConfigError, check_declared, choice, ranged
from .sizes import ENCODER_SIZES, size_defaults

PIPELINES = ('auto', 'dali', 'torch_gpu', 'torch')
SOURCES = ('embedded', 'folder', 'json', 'filelist', 'shards', 'synthetic')
CMAE_MASTER_EXTRA = 32  # docs/spec.md section 7: a 256 master for 224 views


@dataclass
class ModelConfig:
    """The model. Fields left at None are filled from `size` (and `mode`) in __post_init__."""

    size: str = choice('vit_base', tuple(ENCODER_SIZES))
    """Named encoder size: one of ENCODER_SIZES. Explicit fields below override it."""
    mode: str = choice('cmae', ('cmae', 'mae'))
    """'cmae' (online + target branch, block masking) or 'mae' (pixel branch only, per-patch masking)."""
    img_size: int = ranged(224, gt=0)
    in_chans: int = ranged(3, ge=1)
    patch_size: Optional[int] = ranged(None, gt=0)
    embed_dim: Optional[int] = ranged(None, gt=0)
    depth: Optional[int] = ranged(None, ge=1)
    num_heads: Optional[int] = ranged(None, ge=1)
    mlp_ratio: Optional[float] = ranged(None, gt=0)
    decoder_embed_dim: Optional[int] = ranged(None, gt=0)
    """Width of both decoders (official: 512)."""
    decoder_depth: Optional[int] = ranged(None, ge=1)
    """Pixel decoder depth (official: 8)."""
    decoder_num_heads: Optional[int] = ranged(None, ge=1)
    feature_decoder_depth: Optional[int] = ranged(None, ge=1)
    """Feature decoder depth (official: 2)."""
    proj_hidden_dim: Optional[int] = ranged(None, ge=1)
    proj_dim: Optional[int] = ranged(None, ge=1)
    mask_ratio: Optional[float] = ranged(None, gt=0, lt=1)
    """CMAE: fraction of 2x2 blocks hidden (official 0.65). MAE: fraction of patches hidden (0.75)."""
    temperature: float = ranged(0.07, gt=0)
    loss_con_weight: float = ranged(1.0, ge=0)
    loss_rec_weight: float = ranged(1.0, ge=0)
    drop_path: float = ranged(0.0, ge=0, lt=1)
    activation_checkpointing: bool = False
    """Recompute each transformer block in backward instead of storing its activations."""
    compile: str = choice('auto', ('auto', 'eager', 'blocks', 'model'))
    """torch.compile: 'blocks' compiles each transformer block (regional), 'model' the whole model, 'eager' none;
    'auto': blocks on CUDA, eager on a CPU (docs/benchmarks.md). Not with ZeRO-3 (refused at start)."""

    section = 'model'

    def __post_init__(self) -> None:
        check_declared(self, self.section)
        for name, value in size_defaults(self.size, self.mode).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        check_declared(self, self.section)
        self._check_shapes()

    def _check_shapes(self) -> None:
        if self.img_size % self.patch_size:
            raise ConfigError(f'model.img_size {self.img_size} is not a multiple of patch_size {self.patch_size}')
        if self.mode == 'cmae' and self.grid_size % 2:
            raise ConfigError(
                f'model: block masking needs an even patch grid, got {self.grid_size} '
                f'(img_size {self.img_size} / patch_size {self.patch_size})'
            )
        for name, width, heads in (
            ('embed_dim', self.embed_dim, self.num_heads),
            ('decoder_embed_dim', self.decoder_embed_dim, self.decoder_num_heads),
        ):
            if width % heads:
                raise ConfigError(f'model.{name} {width} is not divisible by its number of heads {heads}')
            if width % 4:
                raise ConfigError(f'model.{name} {width} must be a multiple of 4 (2-D sin-cos embedding)')
        if self.num_visible == 0:
            raise ConfigError(f'model.mask_ratio {self.mask_ratio} leaves no visible patch')

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_visible(self) -> int:
        """Visible patches per sample; the same for every sample (docs/spec.md section 2)."""
        if self.mode == 'cmae':
            num_blocks = (self.grid_size // 2) ** 2
            return 4 * int(num_blocks * (1 - self.mask_ratio))
        return int(self.num_patches * (1 - self.mask_ratio))

    @classmethod
    def from_dict(cls, data: dict, where: str = 'model') -> 'ModelConfig':
        from .fields import check_fields, coerce

        check_fields(cls, data, where)
        return cls(**coerce(cls, data, where))


@dataclass
class DataConfig:
    """Where the images come from and how they are turned into batches."""

    source: str = choice('embedded', SOURCES)
    """'embedded' (photos shipped with the package), 'folder' (ImageNet-style), 'json' (official annotation
    file), 'filelist' (one path per line, optionally followed by a label), 'shards' (webdataset tars, read by index;
    launch/make_shards.py packs the other sources), or 'synthetic'."""
    root: str = ''
    """Image folder; for 'json' and 'filelist', the folder that relative paths in `ann_file` start from; for 'shards',
    the folder of .tar files."""
    ann_file: str = ''
    """The official JSON annotation file or the file list, for those sources."""
    pipeline: str = choice('auto', PIPELINES)
    """'auto' (DALI when importable, else torch_gpu on a CUDA device, else torch), 'dali', 'torch_gpu' (JPEGs decoded
    and views made on the device by torch ops) or 'torch' (PIL in DataLoader workers)."""
    num_workers: int = ranged(-1, ge=-1)
    """DataLoader workers (torch pipelines) or DALI CPU threads per rank; -1: sized to the cores this rank owns
    (cmae_ds/data/pipelines/threads.py)."""
    master_extra: Optional[int] = ranged(None, ge=0)
    """The master crop is view + this many pixels (docs/spec.md section 7). Unset: by the model's mode, 32 for CMAE
    (256 for 224 views) and 0 for MAE, whose official view is a random resized crop straight to the view's size."""
    hw_decoder_load: float = ranged(0.65, ge=0, le=1)
    """DALI on a GPU: share of JPEG decoding sent to the hardware decoder (A100/H100 nvJPEG engine)."""

    section = 'data'

    def __post_init__(self) -> None:
        check_declared(self, self.section)
        if self.source in ('folder', 'shards') and not self.root:
            raise ConfigError(f'data.root must be set for data.source {self.source!r}')
        if self.source in ('json', 'filelist') and not self.ann_file:
            raise ConfigError(f'data.ann_file must be set for data.source {self.source!r}')


@dataclass
class RunGuard:
    """What keeps a long run alive on a cluster: the collective timeout, the step watchdog and rollbacks on
    divergence (docs/reliability.md).
    Shared by the train section and the fine-tuning and probing sections."""

    collective_timeout_s: float = ranged(1800.0, gt=0)
    """How long a collective waits for a peer before it fails the run (NCCL/gloo timeout)."""
    stall_factor: float = ranged(20.0, ge=0)
    """Step watchdog: a rank with no optimizer step for this many times the recent median step time (and at least
    stall_min_s) dumps its stacks to the run folder and exits (0: off)."""
    stall_min_s: float = ranged(600.0, ge=0)
    """The watchdog's floor: short steps vary a lot in relative terms (data, GC, logging)."""
    max_rollbacks: int = ranged(3, ge=0)
    """Divergence events (a non-finite loss or gradient norm, a loss spike) the run heals itself from within
    rollback_window_steps: it reloads the newest complete checkpoint before the event and skips the data from there
    to the event plus skip_margin_steps; one more event stops it with exit code 3 (docs/reliability.md). 0: off (a
    non-finite loss stops the run, spikes are not watched, and the step's loss is not read every step)."""
    rollback_window_steps: int = ranged(10000, ge=1)
    """The window of optimizer steps max_rollbacks counts in: a run that diverges again and again is stopped."""
    skip_margin_steps: int = ranged(10, ge=0)
    """Optimizer steps of data after the event also skipped (the batches that followed the culprit)."""
    spike_factor: float = ranged(3.0, ge=0)
    """A loss above this many times the median of the last spike_window_steps steps is a spike (0: no spike rule;
    non-finite values are still events)."""
    spike_window_steps: int = ranged(50, ge=1)
    """Steps in the median; the spike rule is armed once that many healthy steps are seen."""
    spike_steps: int = ranged(3, ge=1)
    """Consecutive spiking steps that make an event (one noisy batch does not)."""
    grad_spike_factor: float = ranged(0.0, ge=0)
    """The same rule on the gradient norm, where DeepSpeed computes one (0: off)."""
    rollback_lr_factor: float = ranged(1.0, gt=0, le=1)
    """lr multiplier for the rollback_lr_steps steps after a rollback."""
    rollback_lr_steps: int = ranged(0, ge=0)


@dataclass
class TrainConfig(RunGuard):
    """Optimization, schedules, checkpoints and logging. Batch sizes and precision live in the DeepSpeed JSON."""

    epochs: int = ranged(300, ge=1)
    warmup_epochs: int = ranged(40, ge=0)
    base_lr: float = ranged(1.5e-4, gt=0)
    """Learning rate per 256 images of global batch (docs/spec.md section 8)."""
    warmup_start_factor: float = ranged(1e-4, ge=0, le=1)
    min_lr: float = ranged(0.0, ge=0)
    weight_decay: float = ranged(0.05, ge=0)
    no_decay: str = choice('official', ('official', 'one_dim'))
    """Which parameters skip weight decay (docs/spec.md section 8): 'official' as the official configs'
    paramwise_cfg (LayerNorms, biases, position embeddings, cls and mask tokens; BatchNorm weights decay);
    'one_dim' every tensor of at most one dimension as well (MAE's and timm's rule)."""
    betas: tuple[float, float] = ranged((0.9, 0.95), ge=0, lt=1)
    momentum_base: float = ranged(0.996, ge=0, le=1)
    momentum_end: float = ranged(0.996, ge=0, le=1)
    optimizer: str = 'auto'
    """'auto' picks a fused AdamW for the device; see cmae_ds.kernels.optim."""
    max_steps: int = ranged(0, ge=0)
    """Stop after this many optimizer steps of this invocation (a resumed run takes that many more; 0: run all
    epochs). Schedules still span all epochs."""
    seed: int = ranged(0, ge=0)
    output_dir: str = 'runs/cmae'
    save_every_steps: int = ranged(1000, ge=0)
    keep_last: int = ranged(3, ge=0)
    """Complete checkpoints kept (0: all)."""
    log_every_steps: int = ranged(10, ge=0)
    image_every_steps: int = ranged(500, ge=0)
    progress_bar: bool = True

    section = 'train'

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        check_declared(self, self.section)
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f'train.warmup_epochs {self.warmup_epochs} must lie in [0, train.epochs]')


@dataclass
class KernelConfig:
    """Fused kernels and the attention backend (docs/kernels.md). The environment overrides these when set:
    CMAE_FUSED=0, CMAE_FUSED_<OP>=0, CMAE_ATTN_BACKEND."""

    fused: bool = True
    """False: every op runs its plain PyTorch reference."""
    attention: bool = True
    adamw: bool = True
    recon_loss: bool = True
    ema: bool = True
    visible_embed: bool = True
    attention_backend: str = choice('auto', ('auto', 'fa3', 'fa2', 'sdpa', 'math'))

    section = 'kernels'

    def __post_init__(self) -> None:
        check_declared(self, self.section)

    def switches(self) -> dict:
        """Arguments of cmae_ds.kernels.configure."""
        off = [op for op in ('attention', 'adamw', 'recon_loss', 'ema', 'visible_embed') if not getattr(self, op)]
        return dict(fused=self.fused, off=off, attention_backend=self.attention_backend)


@dataclass
class KnnConfig:
    """Weighted kNN on frozen features (DINO's protocol): k nearest training images by cosine similarity vote
    with weight exp(similarity / temperature)."""

    k: int = ranged(20, ge=1)
    temperature: float = ranged(0.07, gt=0)
    num_classes: int = ranged(0, ge=0)
    """0: one more than the largest training label."""
    batch_size: int = ranged(64, ge=1)
    """Images per rank per feature-extraction forward."""

    section = 'knn'

    def __post_init__(self) -> None:
        check_declared(self, self.section)


@dataclass
class KnnMonitorConfig(KnnConfig):
    """kNN accuracy of the online encoder during pretraining, on the knn_train / knn_val sets."""

    every_steps: int = ranged(0, ge=0)
    """Run every this many optimizer steps (0: off)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    knn: KnnMonitorConfig = field(default_factory=KnnMonitorConfig)
    """kNN monitor during pretraining: on when knn.every_steps > 0, on the labeled knn_train / knn_val sets."""
    knn_train: DataConfig = field(default_factory=DataConfig)
    knn_val: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        if self.data.master_extra is None:
            self.data.master_extra = master_extra_for(self.model.mode)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def master_extra_for(mode: str) -> int:
    """The official view of each pretraining mode: CMAE's master of view + 32 pixels (its online view the
    top-left window); MAE's RandomResizedCrop to the view's size (configs/pre-training/mae/*.py)."""
    return 0 if mode == 'mae' else CMAE_MASTER_EXTRA


SECTIONS = {
    'model': ModelConfig,
    'data': DataConfig,
    'train': TrainConfig,
    'kernels': KernelConfig,
    'knn': KnnMonitorConfig,
    'knn_train': DataConfig,
    'knn_val': DataConfig,
}
