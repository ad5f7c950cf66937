"""The sections of fine-tuning, linear probing and stand-alone kNN (docs/spec.md section 9). Their YAML files
have the sections model (the encoder's architecture), data (training images), val_data (validation images),
kernels, and one task section: finetune, linprobe or knn. See docs/finetune.md."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

from .fields import ConfigError, check_declared, choice, ranged
from .sections import DataConfig, KernelConfig, KnnConfig, ModelConfig, RunGuard


@dataclass
class ClassifierTrainConfig(RunGuard):
    """Fields shared by fine-tuning and linear probing. Batch sizes and precision live in the DeepSpeed JSON."""

    pretrained: str = ''
    """Starting weights: our pretraining run folder or its model.safetensors (model.pt before), an extracted encoder,
    a timm ViT checkpoint of the same size (ours from to-timm, or timm's / the Hub's), an official pretraining
    checkpoint or an official extracted backbone."""
    num_classes: int = ranged(1000, ge=1)
    epochs: int = ranged(100, ge=1)
    warmup_epochs: int = ranged(5, ge=0)
    base_lr: float = ranged(5e-4, gt=0)
    """Learning rate per 256 images of global batch: lr = base_lr x global_batch / 256."""
    warmup_start_factor: float = ranged(1e-4, ge=0, le=1)
    min_lr: float = ranged(1e-6, ge=0)
    weight_decay: float = ranged(0.05, ge=0)
    img_size: Optional[int] = ranged(None, gt=0)
    """Training and evaluation resolution; None: model.img_size. The position embedding is interpolated."""
    eval_every_epochs: int = ranged(1, ge=0)
    eval_batch_size: int = ranged(0, ge=0)
    """Images per rank per evaluation forward; 0: the JSON's train_micro_batch_size_per_gpu."""
    max_steps: int = ranged(0, ge=0)
    """Stop after this many optimizer steps of this invocation (a resumed run takes that many more; 0: run all
    epochs). Schedules still span all epochs."""
    seed: int = ranged(0, ge=0)
    output_dir: str = 'runs/finetune'
    save_every_steps: int = ranged(0, ge=0)
    """Resumable checkpoints between epoch ends (0: only at each epoch's end, after its evaluation)."""
    keep_last: int = ranged(1, ge=0)
    log_every_steps: int = ranged(10, ge=0)
    progress_bar: bool = True

    section = 'classifier'

    def __post_init__(self) -> None:
        check_declared(self, self.section)
        if self.warmup_epochs > self.epochs:
            where = self.section
            raise ConfigError(f'{where}.warmup_epochs {self.warmup_epochs} must lie in [0, {where}.epochs]')


@dataclass
class FinetuneConfig(ClassifierTrainConfig):
    """The official fine-tuning recipe (docs/spec.md section 9): AdamW, layer-wise lr decay, mixup/cutmix, drop
    path."""

    layer_decay: float = ranged(0.65, gt=0, le=1)
    """lr scale of layer l (0: embeddings, i + 1: block i, depth + 1: fc_norm and head) is
    layer_decay ** (depth + 1 - l)."""
    betas: tuple[float, float] = ranged((0.9, 0.999), ge=0, lt=1)
    drop_path: float = ranged(0.1, ge=0, lt=1)
    smoothing: float = ranged(0.1, ge=0, lt=1)
    mixup: float = ranged(0.8, ge=0)
    """Mixup alpha (0: off)."""
    cutmix: float = ranged(1.0, ge=0)
    """CutMix alpha (0: off)."""
    mixup_prob: float = ranged(1.0, ge=0, le=1)
    """Probability that a batch is mixed at all."""
    mixup_switch_prob: float = ranged(0.5, ge=0, le=1)
    """Probability of CutMix instead of mixup when both are on."""
    optimizer: str = 'auto'
    """AdamW backend, as train.optimizer for pretraining."""

    section = 'finetune'

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        super().__post_init__()

    @property
    def mixes(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


@dataclass
class LinearProbeConfig(ClassifierTrainConfig):
    """MAE's linear probing protocol: frozen encoder, BatchNorm1d(affine=False) + Linear, LARS, 90 epochs."""

    epochs: int = ranged(90, ge=1)
    warmup_epochs: int = ranged(10, ge=0)
    base_lr: float = ranged(0.1, gt=0)
    """MAE: blr 0.1 at batch 16384 -> lr 6.4."""
    warmup_start_factor: float = ranged(0.0, ge=0, le=1)
    """MAE's warmup starts from 0."""
    min_lr: float = ranged(0.0, ge=0)
    weight_decay: float = ranged(0.0, ge=0)
    optimizer: str = choice('lars', ('lars', 'sgd'))
    """'lars' (MAE's LARS: momentum 0.9, trust coefficient 0.001, matrices only) or 'sgd' (momentum 0.9)."""
    momentum: float = ranged(0.9, ge=0, lt=1)
    pool: str = choice('cls', ('cls', 'mean'))
    """Feature fed to the probe: 'cls' (MAE's default: cls token after the final norm) or 'mean' (mean of the
    patch tokens after the final norm)."""
    output_dir: str = 'runs/linprobe'

    section = 'linprobe'


@dataclass
class KnnTaskConfig(KnnConfig):
    """Stand-alone kNN evaluation of a checkpoint's online encoder (launch/knn.py)."""

    pretrained: str = ''
    """The checkpoint whose online encoder is evaluated (any source load_encoder understands)."""
    output_dir: str = 'runs/knn'


TaskSection = Union[FinetuneConfig, LinearProbeConfig, KnnTaskConfig]


@dataclass
class TaskConfig:
    """A fine-tuning, linear-probing or kNN run: model, training data, validation data, kernels, the task."""

    model: ModelConfig
    data: DataConfig
    val_data: DataConfig
    task: TaskSection
    kernels: KernelConfig = field(default_factory=KernelConfig)

    def to_dict(self) -> dict:
        return {
            'model': dataclasses.asdict(self.model),
            'data': dataclasses.asdict(self.data),
            'val_data': dataclasses.asdict(self.val_data),
            'kernels': dataclasses.asdict(self.kernels),
            self.task.section: dataclasses.asdict(self.task),
        }


TASKS = {'finetune': FinetuneConfig, 'linprobe': LinearProbeConfig, 'knn': KnnTaskConfig}


def task_sections(task: str) -> dict:
    return {
        'model': ModelConfig,
        'data': DataConfig,
        'val_data': DataConfig,
        'kernels': KernelConfig,
        task: TASKS[task],
    }
