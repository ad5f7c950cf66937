"""Data for CMAE: sources, the two-view pretraining pipeline (DALI or PyTorch), classification pipelines, tools.

The engines call `build_pretrain_loader`, `build_classification_loader` and `list_samples`; see docs/data.md.
"""

from .build import build_classification_loader, build_pretrain_loader, resolve_pipeline
from .recipe import MEAN, STD
from .sources import DataSourceError, list_samples

__all__ = [
    'build_pretrain_loader',
    'build_classification_loader',
    'list_samples',
    'resolve_pipeline',
    'DataSourceError',
    'MEAN',
    'STD',
]
