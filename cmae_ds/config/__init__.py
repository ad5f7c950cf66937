"""Typed configuration. DeepSpeed's JSON owns ZeRO, precision, batch arithmetic and clipping; these dataclasses own
everything else, and `cmae_ds.config.ds_config.validate` checks the two against each other before anything heavy starts.

sizes.py: the named model sizes. sections.py: the pretraining sections. tasks.py: fine-tuning, probing and kNN.
fields.py: declared ranges and choices, type coercion. loading.py: YAML, presets and overrides.
"""

from .fields import ConfigError
from .loading import PRESET_DIR, apply_overrides, build_config, build_sections, load_config, load_task_config, read_yaml
from .sections import Config, DataConfig, KernelConfig, KnnConfig, KnnMonitorConfig, ModelConfig, RunGuard, TrainConfig
from .sizes import DECODER_MLP_RATIO, ENCODER_SIZES, EncoderSize
from .tasks import TASKS, ClassifierTrainConfig, FinetuneConfig, KnnTaskConfig, LinearProbeConfig, TaskConfig

__all__ = [
    'ConfigError',
    'PRESET_DIR',
    'apply_overrides',
    'build_config',
    'build_sections',
    'load_config',
    'load_task_config',
    'read_yaml',
    'Config',
    'DataConfig',
    'KernelConfig',
    'KnnConfig',
    'KnnMonitorConfig',
    'ModelConfig',
    'RunGuard',
    'TrainConfig',
    'DECODER_MLP_RATIO',
    'ENCODER_SIZES',
    'EncoderSize',
    'TASKS',
    'ClassifierTrainConfig',
    'FinetuneConfig',
    'KnnTaskConfig',
    'LinearProbeConfig',
    'TaskConfig',
]
