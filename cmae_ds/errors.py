"""The errors a user can cause (bad config, data, checkpoint, run folder): launch scripts print them without a
traceback."""

from .config import ConfigError
from .data.errors import DataFileError, DataSourceError
from .modelfiles.formats import CheckpointError
from .storage.output_dir import OutputWriteError


class RunLockedError(RuntimeError):
    """Another run holds the run folder's lock; the message names it."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; training stopped without saving."""


class Diverged(NonFiniteLoss):
    """More divergence events (non-finite loss, loss spike) than the run's rollback budget allows; the message
    names them and the last good checkpoint."""


class Preempted(RuntimeError):
    """A stop was requested (SIGTERM, SIGINT, SIGUSR1, or the launcher died) and a complete checkpoint was
    written: the run resumes from it when started again."""


USER_ERRORS = (ConfigError, CheckpointError, DataSourceError, DataFileError, OutputWriteError, RunLockedError)
