"""What every format reader provides: tensor infos from headers, tensors on demand."""

from __future__ import annotations

import bisect
import ctypes
import errno
import mmap
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CorruptCheckpointError

__all__ = ["TensorInfo", "Reader", "FileStamp", "map_file", "check_bytes", "tensor_from_buffer",
           "release_pages", "read_in"]


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


@dataclass(frozen=True)
class FileStamp:
    """Which file, in which state, a reader read its header from: its bytes must still be those.

    A file rewritten in place keeps its inode but changes its modification time; one cut short
    changes its size; one replaced by a rename is another inode.
    """

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def changes(self, now: FileStamp) -> str:
        """What differs in ``now``, in words (``""``: nothing)."""
        if (now.dev, now.ino) != (self.dev, self.ino):
            return "replaced by another file"
        if now.size != self.size:
            return f"{'cut' if now.size < self.size else 'grown'} from {self.size:,} to {now.size:,} bytes"
        if now.mtime_ns != self.mtime_ns:
            return "rewritten"
        return ""


@dataclass
class Reader:
    """Base of the format readers; subclasses fill the fields and implement `tensor`.

    ``stamp`` records the file as it was when the reader was made (``None`` for folders), so
    that bytes read later are checked to be the ones its header described.
    """

    path: Path
    format: str = "?"
    infos: dict[str, TensorInfo] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    root: str = ""
    roots: tuple[str, ...] = ()
    other_objects: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    stamp: FileStamp | None = None

    def __post_init__(self) -> None:
        if self.stamp is None:
            try:
                st = os.stat(self.path)
            except OSError:
                return  # the reader reports a missing file itself
            if not os.path.isdir(self.path):
                self.stamp = FileStamp.of(st)

    def tensor(self, key: str) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def aliases(self) -> dict[str, str]:
        """alias key -> key whose data it shares (ties recorded by the file)."""
        return {}

    def release(self, key: str) -> None:
        """Drop the mapped pages of ``key``'s data from memory (no-op where nothing is mapped)."""

    def close(self) -> None:
        """Let go of the file mappings; tensors already returned keep theirs alive."""


# live maps: by start address, for read_in to find the file under a tensor; and the mapped
# file's stamp, for check_bytes to see whether the path named another file by then
_MAPS: dict[int, tuple[weakref.ref[mmap.mmap], int, str]] = {}
_STARTS: list[int] = []  # _MAPS's keys, sorted: a lookup is a bisection
_MAPPED: dict[int, FileStamp] = {}  # by id() of the live map


def map_file(path: Path) -> mmap.mmap:
    """Map a file copy-on-write: tensors over it are writable and never change the file."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_size == 0:
            raise CorruptCheckpointError(f"{path}: the file is empty")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    anchor = ctypes.c_char.from_buffer(buf)  # a buffer export, dropped at once: just the address
    start = ctypes.addressof(anchor)
    del anchor
    _MAPS[start] = (weakref.ref(buf, lambda _ref, start=start, ident=id(buf): _forget(start, ident)), len(buf),
                    str(path))
    bisect.insort(_STARTS, start)
    _MAPPED[id(buf)] = FileStamp.of(st)
    return buf


def check_bytes(buf: mmap.mmap, path: Path, stamp: FileStamp | None, key: str, begin: int, end: int) -> None:
    """Check that the mapped file still holds ``key``'s bytes ``[begin, end)`` as when it was opened.

    Pages past a file's end kill the process (SIGBUS) when touched, and the cut part of a page
    reads as zeros, so a reader calls this before handing out a tensor over ``buf``. ``stamp``
    is the file as its header was read: a file cut, grown, rewritten in place or replaced
    before it was mapped is refused. One replaced by a rename after it was mapped is not: the
    map still holds the old file.

    Raises:
        CorruptCheckpointError: naming the file, the key and what changed.
    """
    size = buf.size()  # the mapped file's size now (fstat), whatever the path names today
    if size < end:
        raise CorruptCheckpointError(
            f"{path}: tensor {key!r} lies at bytes {begin:,}..{end:,}, but the file was cut to {size:,} bytes "
            "after it was opened; open it again once it is complete")
    if stamp is None:
        return
    mapped = _MAPPED.get(id(buf)) or stamp
    change = ""
    if (mapped.dev, mapped.ino, mapped.mtime_ns, size) != (stamp.dev, stamp.ino, stamp.mtime_ns, stamp.size):
        change = stamp.changes(FileStamp(mapped.dev, mapped.ino, size, mapped.mtime_ns))
    else:
        try:
            st = os.stat(path)
        except OSError:
            return  # removed: the map keeps the old file's bytes
        if st.st_ino == stamp.ino and st.st_dev == stamp.dev and (st.st_mtime_ns, st.st_size) != (
                stamp.mtime_ns, stamp.size):
            change = stamp.changes(FileStamp.of(st))
    if change:
        raise CorruptCheckpointError(
            f"{path}: the file was {change} after it was opened, so tensor {key!r} may not be what its "
            "header says; open it again once it is complete")


def _forget(start: int, ident: int) -> None:
    _MAPPED.pop(ident, None)
    if _MAPS.pop(start, None) is not None:
        i = bisect.bisect_left(_STARTS, start)
        if i < len(_STARTS) and _STARTS[i] == start:
            del _STARTS[i]


def _mapped_file(address: int) -> tuple[mmap.mmap, int, str] | None:
    """The live map holding ``address``, the offset of ``address`` in it, and its file."""
    i = bisect.bisect_right(_STARTS, address) - 1
    try:
        start = _STARTS[i] if i >= 0 else -1
    except IndexError:  # a map collected meanwhile (weakref callbacks run at any time)
        return None
    entry = _MAPS.get(start)
    if entry is None:
        return None
    ref, length, path = entry
    buf = ref()
    return (buf, address - start, path) if buf is not None and address < start + length else None


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
    if _libc.madvise(start, end - start, _MADV_POPULATE_READ) != 0:
        err = ctypes.get_errno()
        if err != errno.EINVAL:
            raise CorruptCheckpointError(f"{where}: {end - begin:,} bytes of data cannot be read "
                                         f"({os.strerror(err)}; cut short while open, or a disk error)")
        _libc.madvise(start, end - start, _MADV_WILLNEED)  # an older kernel
    # a cut inside the last page leaves that page readable, its lost bytes zeros: ask the file
    mapped = _mapped_file(begin)
    if mapped is not None:
        buf, offset, path = mapped
        size = buf.size()
        if size < offset + (end - begin):
            raise CorruptCheckpointError(
                f"{where}: its data lies at bytes {offset:,}..{offset + end - begin:,} of {path}, which was cut "
                f"to {size:,} bytes after it was opened; open it again once it is complete")


def tensor_from_buffer(buf: Any, offset: int, nbytes: int, dtype: str) -> Any:
    """A 1-D tensor of ``dtype`` over ``nbytes`` bytes of ``buf`` at ``offset``, without copying."""
    import torch

    from ._dtypes import to_torch

    tdtype = to_torch(dtype)
    if nbytes == 0:
        return torch.empty(0, dtype=tdtype)
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset)
    return raw.view(tdtype)
