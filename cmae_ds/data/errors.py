"""The errors of data/, in one place so that every room (sources, views, pipelines) can raise and catch them without
importing each other, and so that they can be caught where DALI is not installed."""


class DataFileError(RuntimeError):
    """A pipeline met a file it cannot decode; the message names it."""


class DataSourceError(ValueError):
    """A data source (folder, annotation file, file list, shards) is missing or malformed; the message names it."""


class ShardError(DataSourceError):
    """A shard is truncated or corrupt, or the index does not describe the shards; the message names the shard."""


class PackError(DataSourceError):
    """make_shards cannot write into OUT (another dataset there, or another plan); the message says why."""
