"""The one family of errors a user can fix. `ctfgen` prints them as one `error: ...` line and exits
with status 2; library callers catch `CtfgenError` (or the subclass they care about)."""


class CtfgenError(Exception):
    """Something the user asked for cannot be done; the message says why and what to do."""


class ConfigError(CtfgenError, ValueError):
    """A config file, override or option is wrong (unknown key, bad value)."""


class MissingFileError(CtfgenError, FileNotFoundError):
    """A file or directory that was named (or that a step needs) does not exist."""


class WrongTypeError(CtfgenError, TypeError):
    """A function got an argument of a kind it cannot use (e.g. a path where a model was expected)."""


class CorruptFileError(CtfgenError, ValueError):
    """A file exists but cannot be read as what it should be."""


class MismatchError(CtfgenError, ValueError):
    """Parts (tokenizer, coarse map, codes, models, checkpoints) that do not belong together."""


class CheckpointError(CtfgenError, RuntimeError):
    """A training checkpoint is missing, unreadable, or does not belong to this run."""


class NonFiniteLossError(CtfgenError, RuntimeError):
    """The loss or gradient became NaN/inf; the weights of that step were not updated."""


class OutputExistsError(CtfgenError, FileExistsError):
    """The output already holds an earlier run and --resume was not given; nothing was overwritten."""


class RunError(CtfgenError, RuntimeError):
    """A run directory cannot be started or continued as asked."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived; a checkpoint of the last finished step was written."""
