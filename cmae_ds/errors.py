"""The errors a user can cause (bad config, data, checkpoint): launch scripts print them without a traceback."""
from .checkpoint import CheckpointError
from .config import ConfigError
from .data.sources import DataFileError, DataSourceError


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; training stopped without saving."""


USER_ERRORS = (ConfigError, CheckpointError, DataSourceError, DataFileError)
