"""Data for CMAE: sources, the two-view pretraining pipeline (DALI or PyTorch), classification pipelines, tools.

The engines call `build_pretrain_loader`, `build_classification_loader` and `list_samples`; see docs/data.md.
"""

from .errors import DataFileError, DataSourceError, ShardError
from .pipelines.build import build_classification_loader, build_pretrain_loader, resolve_pipeline
from .sources.files import list_samples
from .views.recipe import MEAN, STD

__all__ = [
    'build_pretrain_loader',
    'build_classification_loader',
    'list_samples',
    'resolve_pipeline',
    'DataSourceError',
    'DataFileError',
    'ShardError',
    'MEAN',
    'STD',
]
