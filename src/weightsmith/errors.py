"""The exception tree: every error weightsmith raises derives from `WeightsmithError`.

::

    WeightsmithError
    ├── CheckpointError              a checkpoint cannot be opened or read
    │   ├── CheckpointNotFoundError  no file or folder at the path (also FileNotFoundError)
    │   ├── UnknownFormatError       the content is no checkpoint format weightsmith reads
    │   ├── CorruptCheckpointError   truncated, malformed or inconsistent bytes
    │   ├── UnsafeCheckpointError    reading it would execute code; needs ``trust=True``
    │   └── RootError                the chosen root holds no tensors or does not exist
    ├── SaveError                    a checkpoint could not be written (the old file is kept)
    ├── UsageError                   an argument has the wrong type or value (also TypeError, ValueError)
    ├── SelectorError                a selector is malformed or matched nothing
    ├── PlanError                    a load plan cannot be made or applied (every problem listed)
    └── ModelError                   a live model cannot take the requested change
        ├── AssignError              values do not fit the parameters (names, shapes, dtypes)
        └── TieError                 a tie cannot be made or broken

Messages say what went wrong, where (file, key, shapes) and what to do about it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "WeightsmithError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "UnknownFormatError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "RootError",
    "SaveError",
    "UsageError",
    "SelectorError",
    "PlanError",
    "ModelError",
    "AssignError",
    "TieError",
]


class WeightsmithError(Exception):
    """Base class of every error weightsmith raises."""


class CheckpointError(WeightsmithError):
    """A checkpoint cannot be opened or read."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file or folder exists at the given path."""


class UnknownFormatError(CheckpointError):
    """The path holds something that is not a checkpoint format weightsmith reads."""


class CorruptCheckpointError(CheckpointError):
    """The bytes are truncated, malformed or inconsistent with what the header declares."""


class UnsafeCheckpointError(CheckpointError):
    """Reading the file would run code from it; pass ``trust=True`` only for files you vouch for.

    Attributes:
        globals: the dotted names of the offending globals, as read from the pickle opcodes.
    """

    def __init__(self, message: str, *, globals: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.globals = globals


class RootError(CheckpointError):
    """The requested root of a nested checkpoint does not exist or holds no tensors."""


class SaveError(WeightsmithError):
    """A checkpoint could not be written; any previous file at the path is left intact."""


class UsageError(WeightsmithError, TypeError, ValueError):
    """An argument has the wrong type or value; the message lists every problem."""


class SelectorError(WeightsmithError):
    """A selector is malformed, or matched nothing where a match was required."""


class PlanError(WeightsmithError):
    """A plan cannot be made or applied; nothing was changed.

    Attributes:
        problems: one line per problem, naming the keys and shapes involved.
    """

    def __init__(self, message: str, *, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)


class ModelError(WeightsmithError):
    """A live model cannot take the requested change."""


class AssignError(ModelError):
    """Values do not fit the model's parameters; nothing was written.

    Attributes:
        problems: one line per offending entry, naming the key and the shapes or dtypes involved.
    """

    def __init__(self, message: str, *, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems


class TieError(ModelError):
    """A tie cannot be made or broken as requested."""
