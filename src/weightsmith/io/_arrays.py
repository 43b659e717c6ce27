"""Numpy views of the tensors in mapped checkpoint files, so that read commands need no torch.

A view is made where the file holds a tensor's bytes uncompressed: safetensors files and
folders of them, and torch files (zip or legacy) in any strided layout. Elsewhere (files opened
with ``trust=True``, DCP folders, tensors without data) `MappedArrays.get` answers ``None`` and
the caller reads a torch tensor instead. Values numpy has no dtype for are handed out as their
stored bits (bfloat16 as uint16, float8 and packed float4 as uint8), to be widened by
`weightsmith._measure.widen`.
"""

from __future__ import annotations

import errno
import mmap
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import CorruptCheckpointError
from ._base import check_bytes, map_file, release_pages

__all__ = ["MappedArrays", "STORED"]

# torch dtype name -> the numpy dtype of its stored elements
STORED: dict[str, Any] = {
    "bool": np.bool_, "uint8": np.uint8, "int8": np.int8, "int16": np.int16, "uint16": np.uint16,
    "int32": np.int32, "uint32": np.uint32, "int64": np.int64, "uint64": np.uint64,
    "float16": np.float16, "float32": np.float32, "float64": np.float64,
    "complex64": np.complex64, "complex128": np.complex128,
    "bfloat16": np.uint16, "float8_e5m2": np.uint8, "float8_e4m3fn": np.uint8, "float8_e4m3fnuz": np.uint8,
    "float8_e5m2fnuz": np.uint8, "float8_e8m0fnu": np.uint8, "float4_e2m1fn_x2": np.uint8,
}


class MappedArrays:
    """Read-only numpy arrays over the files of an opened checkpoint, one map per file."""

    def __init__(self, checkpoint: Any) -> None:
        self._reader = getattr(checkpoint, "reader", checkpoint)
        self._maps: dict[str, mmap.mmap] = {}
        self._starts: dict[str, int] = {}  # the address each map starts at

    def _locate(self, key: str) -> tuple[Any, tuple[int, int]] | None:
        reader = self._reader
        infos = getattr(reader, "infos", None)
        info = infos.get(key) if isinstance(infos, Mapping) else None
        if info is None or info.dtype not in STORED:
            return None
        shards = getattr(reader, "shards", None)
        if isinstance(shards, Mapping):
            reader = shards.get(info.file)
        layout = getattr(reader, "data_layout", None)
        if callable(layout):  # a strided view of a storage (torch zip files)
            found = layout(key)
            return None if found is None else (reader, found)
        span = getattr(reader, "data_span", None)
        found = span(key) if callable(span) else None
        return None if found is None else (reader, (*found, 0, tuple(info.shape), None))

    def get(self, key: str) -> np.ndarray | None:
        """``key``'s values as an array of its stored elements, in its shape; ``None`` where the
        file cannot be viewed without torch (read those with torch).

        Raises:
            CorruptCheckpointError: the file was cut or rewritten since it was opened.
        """
        located = self._locate(key)
        if located is None:
            return None
        reader, (offset, nbytes, first, shape, strides) = located
        info = self._reader.infos[key]
        dtype = np.dtype(STORED[info.dtype])
        numel = info.numel
        if numel == 0:
            return np.empty(shape, dtype)
        count = nbytes // dtype.itemsize
        if strides is None:
            strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        last = first + sum((n - 1) * s for n, s in zip(shape, strides))
        if first < 0 or min(strides, default=0) < 0 or last >= count:
            return None  # outside its storage: the torch reader says what is wrong
        buf = self._maps.get(str(reader.path))
        if buf is None:
            buf = self._maps[str(reader.path)] = map_file(reader.path)
            self._starts[str(reader.path)] = np.frombuffer(buf, np.uint8, count=1).__array_interface__["data"][0]
        check_bytes(buf, reader.path, reader.stamp, key, offset, offset + nbytes)
        _populate(buf, reader.path, key, offset, nbytes)
        base = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)[first:]
        return np.lib.stride_tricks.as_strided(base, shape, tuple(s * dtype.itemsize for s in strides),
                                               writeable=False)

    def release(self, key: str) -> None:
        """Drop the mapped pages of ``key``'s data from memory."""
        located = self._locate(key)
        if located is not None:
            reader, (offset, nbytes, *_) = located
            buf = self._maps.get(str(reader.path))
            if buf is not None:
                release_pages(buf, offset, nbytes)

    def release_view(self, view: np.ndarray) -> None:
        """Drop the pages wholly under ``view``, a contiguous piece of an array from `get`, once
        read (streaming through a large tensor then keeps only the pieces in flight resident);
        for a copy, nothing."""
        if not (view.flags.c_contiguous and view.nbytes):
            return
        address = view.__array_interface__["data"][0]
        for path, start in self._starts.items():
            buf = self._maps.get(path)
            if buf is not None and start <= address and address + view.nbytes <= start + len(buf):
                release_pages(buf, address - start, view.nbytes)
                return

    def close(self) -> None:
        """Let go of the maps; arrays already handed out keep theirs alive."""
        self._maps = {}
        self._starts = {}


_MADV_POPULATE_READ = 22  # Linux >= 5.14


def _populate(buf: mmap.mmap, path: Any, key: str, offset: int, nbytes: int) -> None:
    """Map in a tensor's pages in one call: faster than a fault per page, and a disk error is
    an exception here rather than a SIGBUS mid-read. Older kernels skip it."""
    if not hasattr(buf, "madvise"):  # Windows
        return
    start = offset // mmap.PAGESIZE * mmap.PAGESIZE
    try:
        buf.madvise(_MADV_POPULATE_READ, start, offset + nbytes - start)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS):
            raise CorruptCheckpointError(f"{path}: tensor {key!r} cannot be read ({e.strerror}; cut short "
                                         "while open, or a disk error)") from e
