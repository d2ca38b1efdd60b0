"""Exception types of the client runtime; each message names the bad value and the fix."""


class EdgeTuneError(RuntimeError):
    """Base class of every error EdgeTune raises on purpose."""


class ZooError(EdgeTuneError):
    """A backbone cannot be found, converted or loaded (says what to install or fix)."""


class DataError(EdgeTuneError):
    """A dataset is missing, malformed or cannot be partitioned as asked."""


class ConfigError(EdgeTuneError, ValueError):
    """A configuration value is out of range; the message names the key and allowed values."""
