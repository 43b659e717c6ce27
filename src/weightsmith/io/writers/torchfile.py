"""torch files out: ``torch.save`` of the whole mapping, written atomically, bytes counted."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ...errors import SaveError
from ._entries import Progress

__all__ = ["write_torch_file"]


def write_torch_file(path: Path, tensors: Mapping[str, Any], *, total: int, progress: Progress | None = None,
                     check: Callable[[Path], None] | None = None) -> list[Path]:
    """``torch.save`` ``tensors`` (ties kept: a shared storage is written once) to ``path`` atomically.

    ``progress(done, total, "")`` follows the bytes written; ``check(written)`` may refuse the
    file before it replaces ``path``.
    """
    import torch

    from ..atomic import atomic_file

    with atomic_file(path) as f:
        try:
            torch.save(dict(tensors), _Counting(f, total, progress))
        except RuntimeError as e:  # torch's zip writer turns a failed write (disk full) into this
            raise SaveError(f"{path}: torch.save failed ({e}); the previous file is intact") from e
        del tensors  # a caller's cast copies can go before the file is read back
        if check is not None:
            f.flush()
            check(Path(f.name))
    return [path]


class _Counting:
    """A file wrapper reporting the bytes ``torch.save`` has written."""

    def __init__(self, f: Any, total: int, progress: Progress | None) -> None:
        self.f, self.total, self.progress, self.done = f, total, progress, 0

    def write(self, data: Any) -> int:
        n = self.f.write(data)
        self.done += len(memoryview(data).cast("B"))
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total, "")
        return n

    def flush(self) -> None:
        self.f.flush()
