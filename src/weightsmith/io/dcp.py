"""``torch.distributed.checkpoint`` folders, read without unpickling anything from them.

A DCP folder holds ``.metadata`` (a pickled ``Metadata``: per key the global shape, dtype and
chunks, and where each chunk's bytes lie) and ``__{rank}_{n}.distcp`` data files. Each tensor
chunk is a small ``torch.save`` archive at a byte range of a data file (``_write_item`` in
torch's ``filesystem.py``). Here ``.metadata`` is walked by the restricted unpickler, and each
chunk is read by the torch-file reader over its byte range: nothing from the folder is ever
unpickled for real, and tensors map straight from the data files.

`DcpReader` backs `weightsmith.open`; ``weightsmith.distributed.WeightsmithDcpReader`` gives
``dcp.load`` the same reading.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from ._base import FileStamp, Reader, TensorInfo, read_in
from ._detect import METADATA_NAME
from ._dtypes import BITS, nbytes_of, unrepresentable
from ._pickle import Opaque, TensorRecord, scan_pickle
from .sharded import confine
from .torchfile import TorchFileReader, unreadable, unsafe_message

__all__ = ["DcpReader", "Chunk", "METADATA_NAME", "open_chunk", "copy_chunk", "map_chunk", "read_object"]

_MAX_METADATA = 1 << 30
_MAX_OBJECT = 1 << 30  # a non-tensor entry beyond 1 GiB is no training state
_MAX_PAIRWISE = 256  # chunks per tensor up to which overlaps are checked pair by pair


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: where it sits in the global tensor and in which file.

    Attributes:
        offsets: its position in the global tensor.
        sizes: its shape.
        file: the data file holding it, relative to the folder (``None``: no storage entry).
        byte_offset, length: where its ``torch.save`` archive lies in ``file``.
        transforms: DCP storage extensions applied to its bytes (compression...), if any.
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str | None
    byte_offset: int | None
    length: int | None
    transforms: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        """Number of elements."""
        return _prod(self.sizes)

    @property
    def slices(self) -> tuple[slice, ...]:
        """Where the chunk sits in the global tensor, as an index."""
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes))


def _prod(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _state(obj: Any, kind: str, path: Path) -> Any:
    if not isinstance(obj, Opaque) or not obj._ws_global.endswith(kind):
        raise CorruptCheckpointError(f"{path}: expected a {kind} in .metadata, found {obj!r:.80}")
    return obj.ws_state


def _dims(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(d) is int and 0 <= d < 1 << 62 for d in value):
        raise ValueError(f"{value!r:.60} is not a tuple of non-negative integers")
    return tuple(value)


class DcpReader(Reader):
    """A DCP folder: global shapes, dtypes and the chunk layout from ``.metadata``; tensors on demand.

    Attributes:
        layout: per tensor key, its chunks.
        objects: per non-tensor key (pickled Python values), where its bytes lie.
        planner_data: the save planner's key paths (plain data), for ``dcp.load``.
        version: the metadata version string, if any.
    """

    def __init__(self, folder: Path) -> None:
        super().__init__(path=folder, format="dcp")
        self.meta_path = meta_path = folder / METADATA_NAME
        self.layout: dict[str, list[Chunk]] = {}
        self.objects: dict[str, Chunk] = {}
        self.planner_data: dict[str, tuple[str | int, ...]] | None = None
        self.version: str | None = None
        self._held: dict[str, TorchFileReader] = {}  # readers of tensors handed out as mapped views
        self._stamps: dict[str, FileStamp] = {}  # data files as they were when opened
        size = meta_path.stat().st_size
        if size > _MAX_METADATA:
            raise CorruptCheckpointError(f"{meta_path}: {size:,} bytes is too large for checkpoint metadata")
        try:
            scan = scan_pickle(meta_path.read_bytes())
        except pickle.UnpicklingError as e:
            raise unreadable(meta_path, "the metadata", e) from e
        if scan.called:
            raise UnsafeCheckpointError(unsafe_message(meta_path, scan.called), globals=scan.called)
        try:
            self._parse(scan.objects[0], meta_path)
        except (AttributeError, TypeError, KeyError, ValueError, IndexError) as e:
            raise CorruptCheckpointError(f"{meta_path}: unexpected metadata layout ({e})") from e

    def _parse(self, top: Any, meta_path: Path) -> None:
        state = _state(top, "Metadata", meta_path)
        files: dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int, tuple[str, ...]]] = {}
        confined: set[str] = set()  # many chunks share a data file: check each name once
        for index, info in (state.get("storage_data") or {}).items():
            idx, where = _state(index, "MetadataIndex", meta_path), _state(info, "_StorageInfo", meta_path)
            rel = str(where["relative_path"])
            if rel not in confined:
                confine(self.path, rel, what=str(meta_path))
                confined.add(rel)
            offset = idx.get("offset")
            transforms = tuple(str(t) for t in (where.get("transform_descriptors") or ()))
            files[(str(idx["fqn"]), None if offset is None else _dims(offset))] = (
                rel, int(where["offset"]), int(where["length"]), transforms)
        infos: dict[str, TensorInfo] = {}
        for key, entry in state["state_dict_metadata"].items():
            key = str(key)
            if isinstance(entry, Opaque) and entry._ws_global.endswith("BytesStorageMetadata"):
                self.other_objects[key] = "bytes"
                rel, off, length, transforms = files.get((key, None), (None, None, None, ()))
                self.objects[key] = Chunk((), (), rel, off, length, transforms)
                continue
            body = _state(entry, "TensorStorageMetadata", meta_path)
            props = body["properties"].ws_state
            dtype = _dtype_name(meta_path, key, props[0] if isinstance(props, tuple) else props["dtype"])
            shape = _dims(body["size"])
            chunks = []
            for chunk in body["chunks"]:
                c = _state(chunk, "ChunkStorageMetadata", meta_path)
                offsets, sizes = _dims(c["offsets"]), _dims(c["sizes"])
                rel, off, length, transforms = files.get((key, offsets), (None, None, None, ()))
                chunks.append(Chunk(offsets, sizes, rel, off, length, transforms))
            _check_cover(meta_path, key, shape, chunks)
            _check_lengths(meta_path, key, dtype, chunks)
            self.layout[key] = chunks
            infos[key] = TensorInfo(key, shape, dtype, nbytes_of(dtype, _prod(shape)),
                                    file=",".join(sorted({c.file for c in chunks if c.file})) or None)
        self.infos = infos
        self.planner_data = _plain_paths(state.get("planner_data"))
        version = state.get("version")
        self.version = version if isinstance(version, str) else None
        files_used = {c.file for v in self.layout.values() for c in v if c.file}
        for rel in files_used:
            try:
                self._stamps[rel] = FileStamp.of(os.stat(self.path / rel))
            except OSError:
                pass  # a missing data file is reported when a tensor in it is read
        self.notes.append(f"{len(files_used)} data file(s)")

    def tensor(self, key: str) -> Any:
        """The global tensor of ``key``: a mapped view of its chunk when it has one, else assembled."""
        import torch

        from ._dtypes import to_torch

        info = self.infos[key]
        chunks = [c for c in self.layout[key] if c.numel]
        if len(chunks) == 1 and chunks[0].sizes == info.shape:
            reader = open_chunk(self.path, key, chunks[0], info.dtype, stamp=self._stamps.get(chunks[0].file or ""))
            self._held[key] = reader
            return reader.tensor("")
        for chunk in chunks:  # every chunk's bytes are there before the whole tensor is allocated
            _data_file(self.path, key, chunk)
        out = torch.empty(info.shape, dtype=to_torch(info.dtype))
        for chunk in chunks:
            copy_chunk(self.path, key, chunk, info.dtype, out[chunk.slices], stamp=self._stamps.get(chunk.file or ""))
        return out

    def release(self, key: str) -> None:
        reader = self._held.pop(key, None)
        if reader is not None:
            reader.release("")

    def close(self) -> None:
        for reader in self._held.values():
            reader.close()
        self._held.clear()


def _dtype_name(meta_path: Path, key: str, value: Any) -> str:
    """The dtype name a tensor's properties give, checked to be one weightsmith reads.

    A dtype is pickled as a reference to a ``torch`` global and never called, so a name the
    allowlist does not know yet (a newer dtype) arrives as an unconstructed placeholder class;
    its name is all that is needed.
    """
    if isinstance(value, type) and issubclass(value, Opaque) and value._ws_global.startswith("torch."):
        name = value._ws_global.removeprefix("torch.")
    elif isinstance(value, str):
        name = value.removeprefix("torch.")
    else:
        raise CorruptCheckpointError(f"{meta_path}: tensor {key!r} has dtype {value!r:.80}, which is no torch dtype")
    why = "weightsmith does not know its size" if name not in BITS else unrepresentable(name)
    if why is not None:
        raise CheckpointError(f"{meta_path}: tensor {key!r} has dtype {name}, which weightsmith cannot read ({why})")
    return name


def _check_cover(meta_path: Path, key: str, shape: tuple[int, ...], chunks: list[Chunk]) -> None:
    """The chunks must lie inside the tensor and cover it exactly once."""
    total = 0
    for c in chunks:
        if len(c.offsets) != len(shape) or len(c.sizes) != len(shape):
            raise CorruptCheckpointError(
                f"{meta_path}: a chunk of {key!r} has offsets {list(c.offsets)} and sizes {list(c.sizes)}, "
                f"but the tensor has {len(shape)} dimension(s)")
        if c.numel and any(o + s > d for o, s, d in zip(c.offsets, c.sizes, shape)):
            raise CorruptCheckpointError(
                f"{meta_path}: the chunk of {key!r} at {list(c.offsets)} of size {list(c.sizes)} reaches "
                f"outside its shape {list(shape)}")
        total += c.numel
    if total != _prod(shape):
        raise CorruptCheckpointError(
            f"{meta_path}: the chunks of {key!r} hold {total:,} elements, its shape {list(shape)} needs "
            f"{_prod(shape):,}")
    full = [c for c in chunks if c.numel]
    if len(full) <= _MAX_PAIRWISE:
        for i, a in enumerate(full):
            for b in full[i + 1:]:
                if all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs
                       in zip(a.offsets, a.sizes, b.offsets, b.sizes)):
                    raise CorruptCheckpointError(
                        f"{meta_path}: the chunks of {key!r} at {list(a.offsets)} and {list(b.offsets)} overlap")


def _check_lengths(meta_path: Path, key: str, dtype: str, chunks: list[Chunk]) -> None:
    """Each stored chunk's archive must be at least as long as the bytes of its elements.

    Checked from the metadata alone, at open: a tensor declared far larger than its files
    (``[2**40]`` over a few bytes) is refused before anything is allocated for it.
    """
    for c in chunks:
        if c.length is None or not c.numel or c.transforms:  # transformed (compressed) bytes may be fewer
            continue
        need = nbytes_of(dtype, c.numel)
        if c.length < need:
            raise CorruptCheckpointError(
                f"{meta_path}: the chunk of {key!r} at {list(c.offsets)} holds {_prod(c.sizes):,} {dtype} "
                f"elements ({need:,} bytes), but its stored archive in {c.file} is {c.length:,} bytes")


def _plain_paths(value: Any) -> dict[str, tuple[str | int, ...]] | None:
    """The planner's flattening map (key -> path of keys), kept only when it is plain data."""
    if not isinstance(value, dict):
        return None
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, (tuple, list)) \
                or not all(type(p) in (str, int) for p in v):
            return None
        out[k] = tuple(v)
    return out


def _data_file(folder: Path, key: str, chunk: Chunk) -> tuple[Path, int, int]:
    """The data file holding ``chunk``, checked to hold its whole byte range, with that range."""
    meta_path = folder / METADATA_NAME
    if chunk.file is None or chunk.byte_offset is None or chunk.length is None:
        raise CorruptCheckpointError(
            f"{meta_path}: the chunk of {key!r} at {list(chunk.offsets)} has no storage entry")
    if chunk.transforms:
        raise CheckpointError(
            f"{folder / chunk.file}: {key!r} is stored through DCP extension(s) {', '.join(chunk.transforms)}, "
            "which weightsmith does not read; save the checkpoint without _extensions")
    path = confine(folder, chunk.file, what=str(meta_path))
    if not path.is_file():
        raise CorruptCheckpointError(f"{path}: the data file holding {key!r} is missing")
    size = path.stat().st_size
    end = chunk.byte_offset + chunk.length
    if chunk.byte_offset < 0 or chunk.length < 0 or end > size:
        raise CorruptCheckpointError(
            f"{path}: {key!r} is stored at bytes {chunk.byte_offset:,}..{end:,}, but the file has "
            f"{size:,} bytes (truncated?)")
    return path, chunk.byte_offset, chunk.length


def open_chunk(folder: Path, key: str, chunk: Chunk, dtype: str, *,
               stamp: FileStamp | None = None) -> TorchFileReader:
    """The reader of one stored chunk of ``key``; its tensor, keyed ``""``, fits the metadata.

    Args:
        folder: the DCP folder.
        key: the tensor's key, for messages.
        chunk: the chunk, from `DcpReader.layout`.
        dtype: the dtype the metadata gives the tensor.
        stamp: the data file as it was when the folder was opened; a file changed since is refused.

    Raises:
        CorruptCheckpointError: naming the data file and the key (missing, truncated or damaged
            bytes; a stored tensor of another shape or dtype).
        UnsafeCheckpointError: the chunk's pickle would call code.
    """
    path, offset, length = _data_file(folder, key, chunk)
    where = f"{path}: {key!r} (bytes {offset:,}..{offset + length:,})"
    try:
        reader = TorchFileReader(path, span=(offset, length))
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{where}: {e}", globals=e.globals) from e
    except CheckpointError as e:
        raise CorruptCheckpointError(f"{where} cannot be read: {e}") from e
    change = stamp.changes(reader.stamp) if stamp is not None and reader.stamp is not None else ""
    if change:
        raise CorruptCheckpointError(f"{where}: the data file was {change} after the checkpoint was opened; "
                                     "open it again once it is complete")
    stored = reader.infos.get("")
    if stored is None or len(reader.infos) != 1:
        raise CorruptCheckpointError(f"{where} holds {', '.join(map(repr, reader.infos))}, not one tensor")
    if stored.shape != chunk.sizes or stored.dtype != dtype:
        raise CorruptCheckpointError(
            f"{where} holds a {stored.dtype} tensor of shape {list(stored.shape)}; the metadata says "
            f"{dtype} {list(chunk.sizes)}")
    return reader


def _check_region(folder: Path, key: str, chunk: Chunk, start: tuple[int, ...] | None,
                  lengths: tuple[int, ...]) -> tuple[int, ...]:
    start = start if start is not None else (0,) * len(chunk.sizes)
    if len(start) != len(chunk.sizes) or len(lengths) != len(chunk.sizes) or any(
            o < 0 or o + n > d for o, n, d in zip(start, lengths, chunk.sizes)):
        raise CheckpointError(f"{folder}: {key!r}: the region at {list(start)} of {list(lengths)} elements lies "
                              f"outside its stored chunk of {list(chunk.sizes)}")
    return start


def copy_chunk(folder: Path, key: str, chunk: Chunk, dtype: str, out: Any, *,
               start: tuple[int, ...] | None = None, stamp: FileStamp | None = None) -> None:
    """Copy the region of a stored chunk at ``start`` (in the chunk), shaped like ``out``, into ``out``.

    When the region is one row-major run of the file and ``out`` is contiguous and of the same
    dtype, its bytes are read straight into ``out``; otherwise through the memory map (pages
    released afterwards, so streaming over a folder keeps one chunk resident).

    Raises:
        CorruptCheckpointError, UnsafeCheckpointError: as `open_chunk`, or when the file ends early.
    """
    import torch

    from ._dtypes import to_torch

    lengths = tuple(out.shape)
    start = _check_region(folder, key, chunk, start, lengths)
    reader = open_chunk(folder, key, chunk, dtype, stamp=stamp)
    span = reader.data_span("")
    direct = out.is_contiguous() and out.dtype == to_torch(dtype) and _one_run(chunk.sizes, lengths)
    if span is not None and direct:
        size = out.element_size()
        first, step = 0, 1
        for o, d in reversed(list(zip(start, chunk.sizes))):
            first += o * step
            step *= d
        _read_exactly(reader.path, span[0] + first * size, out.reshape(-1).view(torch.uint8), key)
        return
    region = _narrow(reader.tensor(""), start, lengths)
    read_in(region, f"{reader.path}: {key!r}")  # a file cut meanwhile raises here, not SIGBUS in the copy
    out.copy_(region)
    reader.release("")


def map_chunk(folder: Path, key: str, chunk: Chunk, dtype: str, lengths: tuple[int, ...], *,
              start: tuple[int, ...] | None = None) -> tuple[Any, TorchFileReader]:
    """The region of a stored chunk at ``start`` as a tensor over the file's memory map, read in now.

    Its pages are faulted in before this returns, so a damaged or shrunk file raises here; a
    later copy out of the region reads memory, not the disk. No private memory is used: the
    pages are the file's, shared with the page cache. Keep the returned reader until done with
    the tensor, then call ``reader.release("")``.

    Raises:
        CorruptCheckpointError, UnsafeCheckpointError: as `open_chunk`, or when its bytes cannot be read.
    """
    start = _check_region(folder, key, chunk, start, tuple(lengths))
    reader = open_chunk(folder, key, chunk, dtype)
    region = _narrow(reader.tensor(""), start, tuple(lengths))
    read_in(region, f"{reader.path}: {key!r}")
    return region, reader


def _narrow(tensor: Any, start: tuple[int, ...], lengths: tuple[int, ...]) -> Any:
    for dim, (o, n) in enumerate(zip(start, lengths)):
        tensor = tensor.narrow(dim, o, n)
    return tensor


def _one_run(shape: tuple[int, ...], lengths: tuple[int, ...]) -> bool:
    """Whether a box of a row-major tensor is one contiguous run of its elements.

    It is when every dimension before the first one longer than 1 has length 1 and every
    dimension after it is taken whole.
    """
    k = 0
    while k < len(lengths) and lengths[k] == 1:
        k += 1
    return all(n == d for n, d in zip(lengths[k + 1:], shape[k + 1:]))


def _read_exactly(path: Path, offset: int, out: Any, key: str) -> None:
    """Fill the uint8 tensor ``out`` with the file's bytes at ``offset``."""
    view = memoryview(out.numpy())
    done = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise CorruptCheckpointError(
                    f"{path}: {key!r} ends at byte {offset + done:,}, {len(view) - done:,} bytes early (truncated?)")
            done += got


def read_object(folder: Path, key: str, chunk: Chunk) -> Any:
    """A non-tensor entry (``"epoch": 3``), read with the restricted unpickler: plain values only.

    Raises:
        CorruptCheckpointError: the bytes are missing, truncated or no ``torch.save`` archive.
        UnsafeCheckpointError: the value is not plain data (its pickle calls code or names classes).
    """
    path, offset, length = _data_file(folder, key, chunk)
    if length > _MAX_OBJECT:
        raise CorruptCheckpointError(f"{path}: entry {key!r} declares {length:,} bytes, too large")
    with open(path, "rb") as f:
        f.seek(offset)
        blob = f.read(length)
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            data = zf.read(pkls[0]) if pkls else None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, NotImplementedError) as e:
        raise CorruptCheckpointError(f"{path}: entry {key!r} is no readable torch.save archive ({e})") from e
    if data is None:
        raise CorruptCheckpointError(f"{path}: entry {key!r} is a zip archive without data.pkl")
    try:
        scan = scan_pickle(data)
    except pickle.UnpicklingError as e:
        raise unreadable(path, f"entry {key!r}", e) from e
    if scan.called:
        raise UnsafeCheckpointError(unsafe_message(path, scan.called), globals=scan.called)
    return _plain(scan.objects[0], f"{path}: entry {key!r}", 0)


_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def _plain(value: Any, where: str, depth: int) -> Any:
    """``value`` rebuilt from builtins only; anything else is refused."""
    if depth > 64:
        raise CorruptCheckpointError(f"{where}: nested more than 64 levels deep")
    if type(value) in _SCALARS:
        return value
    if isinstance(value, dict) and not isinstance(value, Opaque):
        return {_plain(k, where, depth + 1): _plain(v, where, depth + 1) for k, v in value.items()}
    if type(value) in (list, tuple, set, frozenset):
        return type(value)(_plain(v, where, depth + 1) for v in value)
    name = value._ws_global if isinstance(value, Opaque) else (
        "tensor" if isinstance(value, TensorRecord) else type(value).__name__)
    raise UnsafeCheckpointError(
        f"{where} holds a {name}; weightsmith reads only plain values (numbers, strings, lists, dicts) "
        "from a DCP folder's non-tensor entries", globals=(name,))
