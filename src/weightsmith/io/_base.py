"""What every format reader provides: tensor infos from headers, tensors on demand."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CorruptCheckpointError

__all__ = ["TensorInfo", "Reader", "map_file", "tensor_from_buffer", "release_pages", "read_in"]


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint header says about one tensor; reading it loads no data.

    Attributes:
        key: the tensor's name in the checkpoint.
        shape: its shape.
        dtype: the torch dtype name (``"float32"``, ``"bfloat16"``...).
        nbytes: bytes of its data.
        storage: an id shared by the keys whose data is one storage (tied), else ``None``.
        file: the file holding its data, for folders of shards.
    """

    key: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    storage: str | None = None
    file: str | None = None

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "shape": list(self.shape), "dtype": self.dtype,
                "nbytes": self.nbytes, "numel": self.numel, "storage": self.storage}


@dataclass
class Reader:
    """Base of the format readers; subclasses fill the fields and implement `tensor`."""

    path: Path
    format: str = "?"
    infos: dict[str, TensorInfo] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    root: str = ""
    roots: tuple[str, ...] = ()
    other_objects: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def tensor(self, key: str) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def aliases(self) -> dict[str, str]:
        """alias key -> key whose data it shares (ties recorded by the file)."""
        return {}

    def release(self, key: str) -> None:
        """Drop the mapped pages of ``key``'s data from memory (no-op where nothing is mapped)."""

    def close(self) -> None:
        """Let go of the file mappings; tensors already returned keep theirs alive."""


def map_file(path: Path) -> mmap.mmap:
    """Map a file copy-on-write: tensors over it are writable and never change the file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise CorruptCheckpointError(f"{path}: the file is empty")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def release_pages(buf: mmap.mmap, offset: int, nbytes: int) -> None:
    """Drop the pages lying wholly inside ``nbytes`` bytes at ``offset`` of a copy-on-write map.

    Unmodified pages are read back from the file on the next access, so tensors over them stay
    valid; pages a tensor wrote to revert to the file's bytes. Pages shared with neighbouring
    data (at either end) are kept. Streaming readers call this once done with a tensor, so that
    resident memory stays near one tensor rather than growing to the whole file.
    """
    page = mmap.PAGESIZE
    start = -(-offset // page) * page
    stop = (offset + nbytes) // page * page
    if stop > start and hasattr(mmap, "MADV_DONTNEED"):
        buf.madvise(mmap.MADV_DONTNEED, start, stop - start)


_MADV_POPULATE_READ = 22  # Linux >= 5.14
_MADV_WILLNEED = 3
_libc: Any = None


def read_in(tensor: Any, where: str | Path) -> None:
    """Fault in the pages under a tensor over a file map: read from disk now, errors raised now.

    Touching a map past the end of its file, or a page the disk cannot return, kills the
    process (SIGBUS); reading in first turns both into an exception while nothing has been
    written yet. Only the pages the tensor spans are read (a row slice of a large tensor reads
    its rows). Kernels older than 5.14 get a read-ahead hint instead, without error reporting;
    elsewhere this does nothing.

    Raises:
        CorruptCheckpointError: the bytes cannot be read (file shrunk, I/O error), naming ``where``
            (the file, and the key where known).
    """
    global _libc
    if tensor.numel() == 0 or tensor.device.type != "cpu":  # only host memory is ever mapped
        return
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride()))
    begin = tensor.data_ptr()
    end = begin + span * tensor.element_size()
    start = begin // mmap.PAGESIZE * mmap.PAGESIZE
    if _libc.madvise(start, end - start, _MADV_POPULATE_READ) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EINVAL:  # an older kernel
        _libc.madvise(start, end - start, _MADV_WILLNEED)
        return
    raise CorruptCheckpointError(f"{where}: {end - begin:,} bytes of data cannot be read "
                                 f"({os.strerror(err)}; cut short while open, or a disk error)")


def tensor_from_buffer(buf: Any, offset: int, nbytes: int, dtype: str) -> Any:
    """A 1-D tensor of ``dtype`` over ``nbytes`` bytes of ``buf`` at ``offset``, without copying."""
    import torch

    from ._dtypes import to_torch

    tdtype = to_torch(dtype)
    if nbytes == 0:
        return torch.empty(0, dtype=tdtype)
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset)
    return raw.view(tdtype)
