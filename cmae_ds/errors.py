"""The errors a user can cause (bad config, data, checkpoint, run folder): launch scripts print them without a
traceback."""
from .checkpoint import CheckpointError
from .config import ConfigError
from .data.sources import DataFileError, DataSourceError
from .engine.output_dir import OutputWriteError
from .engine.run_lock import RunLockedError

USER_ERRORS = (ConfigError, CheckpointError, DataSourceError, DataFileError, OutputWriteError, RunLockedError)
