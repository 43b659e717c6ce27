"""``torch.save`` files, zip and legacy, read without unpickling anything from them.

The pickle is walked by the restricted reader of `._pickle`, which records each tensor's
storage key, dtype, offset, shape and stride; the storages are then memory-mapped straight
from the file (entries are stored uncompressed). No torch import is needed to list keys.

Limits, so that a small hostile file cannot claim large resources or be read two ways:

- an archive with two members of one name, or members under two record prefixes, is
  refused (readers disagree on which one counts: torch reads the first);
- a deflated ``data.pkl`` may inflate to at most the file's size plus 32 MiB, and the objects
  its pickle builds are charged against twice the file's size plus 192 MiB;
- a tensor whose elements overlap (an expanded, stride-0 view) may describe at most
  `MAX_EXPANDED_BYTES` (256 MiB) of values; beyond that it is refused rather than materialised.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

from ..errors import CorruptCheckpointError, RootError, UnknownFormatError, UnsafeCheckpointError
from ._base import Reader, TensorInfo, check_bytes, map_file, release_pages, tensor_from_buffer
from ._dtypes import BITS, nbytes_of
from ._pickle import MAX_NUMEL, Opaque, PickleScan, StorageRef, TensorRecord, budget_for, scan_pickle, scan_pickles
from ._tree import choose_root, find_roots, flatten, other_objects, resolve_root

__all__ = ["TorchFileReader", "LEGACY_MAGIC", "MAX_EXPANDED_BYTES", "unsafe_message", "unreadable", "is_zip",
           "zip_layout_problem", "pickle_limit"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
MAX_EXPANDED_BYTES = 256 << 20  # values an overlapping (stride-0) tensor may describe
_MAX_PICKLE = 1 << 30  # a data.pkl beyond 1 GiB is no state dict
_MAX_DEPTH = 1000  # containers nested deeper hold no state dict
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")


def pickle_limit(file_size: int) -> int:
    """Bytes a pickle inside a file of ``file_size`` bytes may inflate to."""
    return min(_MAX_PICKLE, file_size + (32 << 20))


def zip_layout_problem(path: Path, names: list[str]) -> str | None:
    """Why a zip's member names are ambiguous (duplicates, several record prefixes), or None.

    Different readers resolve such archives differently (torch reads the first of two
    ``archive/data.pkl``, Python's zipfile the last), so what one checks another may not load.
    """
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return (f"{path}: the archive holds two members named {name!r}; readers disagree on which one "
                    "counts (torch reads the first), so it is refused. Re-save it from a trusted copy")
        seen.add(name)
    prefixes = sorted({n.partition("/")[0] for n in names if "/" in n})
    if len(prefixes) > 1 and any(n.endswith("/data.pkl") for n in names):
        return (f"{path}: the archive holds records under {len(prefixes)} prefixes "
                f"({', '.join(repr(p) for p in prefixes[:4])}); a torch.save archive has one, and readers "
                "disagree on which one counts, so it is refused")
    return None


def unsafe_message(path: Path, called: tuple[str, ...], findings: Any = ()) -> str:
    """The error text for a file whose pickle would call code; ``findings`` say where (first three)."""
    names = ", ".join(called[:8]) + (f" and {len(called) - 8} more" if len(called) > 8 else "")
    where = "; ".join(str(f) for f in list(findings)[:3])
    return (f"{path}: loading it would call {names} (read from the pickle opcodes, not run"
            f"{': ' + where if where else ''}). "
            "Only tensors and plain containers are read by default; if you trust where the file "
            "came from, open it with trust=True (CLI: --trust)")


def unreadable(path: Path, what: str, error: pickle.UnpicklingError, *, trust: bool = False) -> Exception:
    """The error for a pickle the restricted reader could not finish.

    If it called code before the point where it broke, a real unpickler would have run that
    code: the file is unsafe rather than merely damaged.
    """
    partial = getattr(error, "scan", None)
    called = partial.called if isinstance(partial, PickleScan) else ()
    if called and not trust:
        return UnsafeCheckpointError(unsafe_message(path, called, partial.findings), globals=called)
    return CorruptCheckpointError(f"{path}: {what} cannot be read ({error})")


class TorchFileReader(Reader):
    """A ``torch.save`` checkpoint (zip or legacy); tensors map copy-on-write from the file."""

    def __init__(self, path: Path, *, root: str | None = None, trust: bool = False,
                 span: tuple[int, int] | None = None) -> None:
        super().__init__(path=path, format="torch")
        # span: (offset, length) of an archive inside a larger file, such as one chunk of a
        # torch.distributed.checkpoint data file; zip offsets count from its start
        self._span = span
        self._start, self._size = span if span is not None else (0, path.stat().st_size)
        self._spans: dict[str, tuple[int, int]] = {}  # storage key -> (file offset, bytes)
        self._bases: dict[str, Any] = {}
        self._map: Any = None
        self._trusted = False
        self._trust = trust
        if span is not None or is_zip(path):
            tree, self.scan = self._read_zip()
            if span is not None and isinstance(tree, TensorRecord):
                tree = {"": tree}  # a DCP chunk is torch.save(tensor): one tensor, keyed ""
        elif _starts_with(path, b"PK\x03\x04"):
            raise CorruptCheckpointError(f"{path}: a zip archive without its central directory (truncated?)")
        else:
            self.format = "torch-legacy"
            tree, self.scan = self._read_legacy()
        if self.scan.called and not trust:
            raise UnsafeCheckpointError(unsafe_message(path, self.scan.called, self.scan.findings),
                                        globals=self.scan.called)
        # a pickled nn.Module keeps its tensors inside objects the restricted reader never builds
        if trust and (self.scan.called or not find_roots(tree, self._is_tensor)):
            tree = self._load_trusted()
        self._records = self._select_root(tree, root)
        self.infos = self._infos()

    # -- zip ------------------------------------------------------------------------------
    def _read_zip(self) -> tuple[Any, PickleScan]:
        path = self.path
        try:
            with self._archive() as source, zipfile.ZipFile(source) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, NotImplementedError) as e:
            raise CorruptCheckpointError(f"{path}: damaged zip archive ({e})") from e
        problem = zip_layout_problem(path, [i.filename for i in infos])
        if problem:
            raise CorruptCheckpointError(problem)
        entries = {i.filename: i for i in infos}
        pkls = [n for n in entries if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkls:
            raise UnknownFormatError(f"{path}: a zip file without data.pkl, not a torch.save checkpoint")
        prefix = pkls[0][: -len("data.pkl")]
        if f"{prefix}constants.pkl" in entries or any(n.startswith(f"{prefix}code/") for n in entries):
            raise UnsafeCheckpointError(
                f"{path}: a TorchScript archive, which carries code; weightsmith reads state dicts. "
                "If you trust it, load it with torch.jit.load and save its state_dict()",
                globals=("torch.jit",))
        byteorder = entries.get(f"{prefix}byteorder")
        order = byteorder and (self._raw(byteorder) if byteorder.compress_type == zipfile.ZIP_STORED
                               else self._inflate(byteorder))  # re-zipped files deflate it too
        if order and order.strip() not in (b"little", b""):
            raise CorruptCheckpointError(f"{path}: big-endian checkpoints are not supported")
        info = entries[pkls[0]]
        if info.file_size > pickle_limit(self._size):
            raise CorruptCheckpointError(
                f"{path}: data.pkl declares {info.file_size:,} bytes, more than the file's size plus 32 MiB; "
                "a checkpoint pickle is never that compressible: refusing a decompression bomb")
        data = self._raw(info) if info.compress_type == zipfile.ZIP_STORED else self._inflate(info)
        try:
            scan = scan_pickle(data, budget=max(budget_for(self._size) - len(data), 0))
        except pickle.UnpicklingError as e:
            raise unreadable(path, "data.pkl", e, trust=self._trust) from e
        if not self._trust and not scan.called:
            self._refuse_hidden_pickles(entries, pkls[0])
        for ref in _storage_refs(scan.objects[0]):
            name = f"{prefix}data/{ref.key}"
            entry = entries.get(name)
            if entry is None:
                raise CorruptCheckpointError(f"{path}: storage {ref.key!r} is missing from the archive")
            if entry.compress_type != zipfile.ZIP_STORED:
                raise CorruptCheckpointError(
                    f"{path}: storage {ref.key!r} is compressed ({entry.compress_size:,} bytes inflating to "
                    f"{entry.file_size:,}); torch.save stores storages uncompressed, refusing to inflate it")
            need = nbytes_of(ref.dtype, ref.numel)
            if entry.file_size < need:
                raise CorruptCheckpointError(
                    f"{path}: storage {ref.key!r} holds {entry.file_size:,} bytes, its tensors need {need:,}")
            self._spans[ref.key] = (self._data_offset(entry), need)
        return scan.objects[0], scan

    def _refuse_hidden_pickles(self, entries: dict[str, zipfile.ZipInfo], data_pkl: str) -> None:
        """Refuse an archive carrying another ``.pkl`` member that would call code.

        torch.load never reads such a member, but a file that hides one is not a plain
        checkpoint, and the next tool to open it may unpickle it.
        """
        for name, info in entries.items():
            if name == data_pkl or not name.endswith(".pkl") or info.file_size > pickle_limit(self._size):
                continue
            try:
                data = self._raw(info) if info.compress_type == zipfile.ZIP_STORED else self._inflate(info)
                called = scan_pickles(io.BytesIO(data)).called
            except pickle.UnpicklingError as e:
                partial = getattr(e, "scan", None)
                called = partial.called if isinstance(partial, PickleScan) else ()
            except CorruptCheckpointError:
                continue  # unreadable bytes that nothing reads
            if called:
                raise UnsafeCheckpointError(
                    f"{self.path}: member {name!r} is a pickle that would call {', '.join(called[:8])} "
                    "(read from its opcodes, not run); torch.load skips it, but a checkpoint that hides "
                    "one is not plain data. If you trust where the file came from, open it with trust=True",
                    globals=called)

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        if not 0 <= info.header_offset <= self._size - _LOCAL_HEADER.size:
            raise CorruptCheckpointError(
                f"{self.path}: zip entry {info.filename!r} starts at {info.header_offset}, outside the file")
        with open(self.path, "rb") as f:
            f.seek(self._start + info.header_offset)
            head = f.read(_LOCAL_HEADER.size)
        if len(head) < _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
            raise CorruptCheckpointError(f"{self.path}: zip entry {info.filename!r} has a damaged local header")
        fields = _LOCAL_HEADER.unpack(head)
        start = self._start + info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
        if start + info.file_size > self._start + self._size:
            raise CorruptCheckpointError(
                f"{self.path}: zip entry {info.filename!r} runs past the end of the file (truncated?)")
        return start

    def _raw(self, info: zipfile.ZipInfo) -> bytes:
        start = self._data_offset(info)
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(info.file_size)

    def _inflate(self, info: zipfile.ZipInfo) -> bytes:
        limit = pickle_limit(self._size)
        try:
            with self._archive() as source, zipfile.ZipFile(source) as zf, zf.open(info) as member:
                data = member.read(limit + 1)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, zlib.error) as e:
            raise CorruptCheckpointError(f"{self.path}: {info.filename!r} cannot be inflated ({e})") from e
        if len(data) > limit:
            raise CorruptCheckpointError(
                f"{self.path}: {info.filename!r} inflates past {limit:,} bytes (the file's size plus 32 MiB); "
                "a checkpoint pickle is never that compressible: refusing a decompression bomb")
        return data

    def _archive(self) -> Any:
        """What `zipfile` opens: the path, or a window onto the span holding the archive."""
        if self._span is None:
            return contextlib.nullcontext(self.path)
        return io.BufferedReader(_Window(self.path, self._start, self._size))

    # -- legacy ---------------------------------------------------------------------------
    def _read_legacy(self) -> tuple[Any, PickleScan]:
        path = self.path
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":
                raise UnknownFormatError(f"{path}: not a safetensors, torch.save or folder checkpoint")
            f.seek(0)
            try:
                # the magic number first: a plain pickle is another format, not a damaged file
                first = scan_pickles(f, count=1, legacy=True, budget=budget_for(self._size))
                if first.called and not self._trust:
                    raise UnsafeCheckpointError(unsafe_message(path, first.called, first.findings), globals=first.called)
                magic = first.objects[0]
                if magic != LEGACY_MAGIC:
                    raise UnknownFormatError(f"{path}: a pickle file, not a torch.save checkpoint")
                f.seek(0)
                scan = scan_pickles(f, count=5, legacy=True, budget=budget_for(self._size))
            except pickle.UnpicklingError as e:
                raise unreadable(path, "the legacy torch file", e, trust=self._trust) from e
            if scan.called and not self._trust:  # before the checks below trip over a stand-in
                raise UnsafeCheckpointError(unsafe_message(path, scan.called, scan.findings), globals=scan.called)
            _magic, _proto, _sysinfo, tree, keys = scan.objects
            if not isinstance(keys, list):
                raise CorruptCheckpointError(f"{path}: legacy storage key list is damaged")
            dtypes = {r.key: r.dtype for r in _storage_refs(tree)}
            pos = f.tell()
            for key in keys:
                f.seek(pos)
                head = f.read(8)
                if len(head) < 8 or str(key) not in dtypes:
                    raise CorruptCheckpointError(f"{path}: storage {key!r} is missing (truncated?)")
                (numel,) = struct.unpack("<q", head)
                nbytes = nbytes_of(dtypes[str(key)], numel) if numel >= 0 else -1
                if nbytes < 0 or pos + 8 + nbytes > self._size:
                    raise CorruptCheckpointError(f"{path}: storage {key!r} runs past the end (truncated?)")
                self._spans[str(key)] = (pos + 8, nbytes)
                pos += 8 + nbytes
        self.notes.append("legacy (pre-1.6) torch.save format")
        return tree, scan

    # -- trusted --------------------------------------------------------------------------
    def _load_trusted(self) -> Any:
        import torch

        self._trusted = True
        self.notes.append("opened with trust=True: the file's pickle was executed")
        obj = torch.load(self.path, map_location="cpu", weights_only=False,
                         mmap=self.format == "torch")
        if isinstance(obj, torch.nn.Module):
            obj = obj.state_dict()
        return obj

    # -- common ---------------------------------------------------------------------------
    def _is_tensor(self, value: Any) -> bool:
        if self._trusted:
            import torch

            return isinstance(value, torch.Tensor)
        return isinstance(value, TensorRecord)

    def _select_root(self, tree: Any, root: str | None) -> dict[str, Any]:
        if not self._trusted:
            _check_depth(self.path, tree)
        found = find_roots(tree, self._is_tensor)
        self.roots = tuple(p for p, _ in found)
        chosen = root if root is not None else choose_root(found)
        if chosen is None:
            held = ", ".join(self.scan.constructed[:5]) or "no tensors"
            raise RootError(
                f"{self.path}: no state dict found (the file holds {held}); if it is a pickled model "
                "you trust, open it with trust=True")
        try:
            node = resolve_root(tree, chosen)
        except (KeyError, IndexError, ValueError) as e:
            alts = ", ".join(repr(r) for r in self.roots[:10]) or "none"
            raise RootError(f"{self.path}: no root {chosen!r}; roots holding tensors: {alts}") from e
        records, others = flatten(node, self._is_tensor)
        if not records:
            alts = ", ".join(repr(r) for r in self.roots[:10]) or "none"
            raise RootError(f"{self.path}: root {chosen!r} holds no tensors; roots holding tensors: {alts}")
        self.root = chosen
        self.other_objects = {**{f"{chosen}/{k}" if chosen else k: v for k, v in others.items()},
                              **other_objects(tree, self._is_tensor, chosen)}
        if not self._trusted:
            for key, rec in records.items():
                self._check_extent(key, rec)
        return records

    def _check_extent(self, key: str, rec: TensorRecord) -> None:
        if not isinstance(rec.shape, tuple) or not isinstance(rec.stride, tuple) or rec.dtype not in BITS:
            raise CorruptCheckpointError(f"{self.path}: tensor {key!r} has a damaged record")
        if len(rec.shape) != len(rec.stride) or any(d < 0 for d in rec.shape) or rec.offset < 0:
            raise CorruptCheckpointError(f"{self.path}: tensor {key!r} has an invalid shape {rec.shape}")
        numel = 1
        last = rec.offset
        for d, s in zip(rec.shape, rec.stride):
            numel *= d
            last += (d - 1) * s if d else 0
        if numel > MAX_NUMEL:
            raise CorruptCheckpointError(
                f"{self.path}: tensor {key!r} of shape {list(rec.shape)} has {numel:,} elements, more than "
                "torch can index")
        if rec.storage is None:
            return
        available = _elements(rec)
        if numel and (last >= available or any(s < 0 for s in rec.stride)):
            raise CorruptCheckpointError(
                f"{self.path}: tensor {key!r} {list(rec.shape)} reaches element {last} of a storage "
                f"of {available} elements")
        logical = nbytes_of(rec.dtype, numel)
        if numel and last + 1 < numel and logical > MAX_EXPANDED_BYTES:
            # an expanded view: few stored bytes standing for many values, which every copy,
            # conversion or save would write out in full
            raise CorruptCheckpointError(
                f"{self.path}: tensor {key!r} of shape {list(rec.shape)} and stride {list(rec.stride)} "
                f"spreads {(last + 1) * BITS[rec.dtype] // 8:,} stored bytes over {logical:,} bytes of values "
                f"(an expanded, stride-0 view); such views are read up to {MAX_EXPANDED_BYTES >> 20} MiB. "
                "Save the tensor contiguous (tensor.contiguous()) or its unexpanded source")

    def _infos(self) -> dict[str, TensorInfo]:
        views: dict[tuple[Any, ...], list[str]] = {}
        specs: dict[str, tuple[tuple[int, ...], str]] = {}
        for key, rec in self._records.items():
            if self._trusted:
                shape, dtype = tuple(rec.shape), str(rec.dtype).removeprefix("torch.")
                ident: tuple[Any, ...] = (rec.untyped_storage().data_ptr(), rec.storage_offset(),
                                          shape, tuple(rec.stride())) if rec.device.type != "meta" else (key,)
            else:
                shape, dtype = rec.shape, rec.dtype
                ident = ((rec.storage.key, rec.storage.view_offset, rec.offset, rec.shape, rec.stride, rec.dtype)
                         if rec.storage else (key,))
            views.setdefault(ident, []).append(key)
            specs[key] = (shape, dtype)
        storage_of = {k: group[0] for group in views.values() if len(group) > 1 for k in group}
        infos = {}
        for key, (shape, dtype) in specs.items():
            numel = 1
            for d in shape:
                numel *= d
            infos[key] = TensorInfo(key, shape, dtype, nbytes_of(dtype, numel) if dtype in BITS else 0,
                                    storage=storage_of.get(key))
        return infos

    def tensor(self, key: str) -> Any:
        import torch

        rec = self._records[key]
        if self._trusted:
            return rec
        if rec.storage is None:
            return torch.empty(rec.shape, dtype=_torch_dtype(rec.dtype), device="meta")
        try:
            if self._map is None:
                self._map = map_file(self.path)
            start, nbytes = self._spans[rec.storage.key]
            check_bytes(self._map, self.path, self.stamp, key, start, start + nbytes)  # cut or rewritten since
            base = self._base(rec.storage, rec.dtype)
            return torch.as_strided(base, rec.shape, rec.stride, _view_elements(rec) + rec.offset)
        except RuntimeError as e:  # the pickle's view of a storage disagrees with the storage's bytes
            raise CorruptCheckpointError(f"{self.path}: tensor {key!r} does not fit its storage ({e})") from e

    def data_span(self, key: str) -> tuple[int, int] | None:
        """Where ``key``'s bytes lie in the file, ``(offset, nbytes)``, when they are one row-major run.

        Such a tensor can be read straight into a buffer (``readinto``) instead of through the
        memory map; ``None`` for other layouts, sub-byte dtypes and trusted files.
        """
        rec = self._records[key]
        if self._trusted or rec.storage is None or BITS.get(rec.dtype, 0) % 8:
            return None
        step, numel = 1, 1
        for d, s in reversed(list(zip(rec.shape, rec.stride))):
            if d != 1 and s != step:
                return None
            step *= d
            numel *= d
        size = BITS[rec.dtype] // 8
        start, _ = self._spans[rec.storage.key]
        return start + (_view_elements(rec) + rec.offset) * size, numel * size

    def data_layout(self, key: str) -> tuple[int, int, int, tuple[int, ...], tuple[int, ...]] | None:
        """``key`` as a strided view of its storage's bytes in the file: ``(storage offset,
        storage nbytes, first element, shape, strides in elements)``.

        What lets a reader without torch view any layout; ``None`` for trusted files, tensors
        without data and sub-byte dtypes.
        """
        rec = self._records[key]
        if self._trusted or rec.storage is None or BITS.get(rec.dtype, 0) % 8:
            return None
        start, nbytes = self._spans[rec.storage.key]
        return start, nbytes, _view_elements(rec) + rec.offset, tuple(rec.shape), tuple(rec.stride)

    def release(self, key: str) -> None:
        rec = self._records[key]
        if self._trusted or self._map is None or rec.storage is None:
            return
        offset, nbytes = self._spans[rec.storage.key]  # the whole storage: views share its pages
        release_pages(self._map, offset, nbytes)

    def close(self) -> None:
        self._map, self._bases = None, {}


    def _base(self, ref: StorageRef, dtype: str) -> Any:
        """The storage's bytes as a 1-D tensor of ``dtype`` (an untyped storage is viewed as the tensor's)."""
        base = self._bases.get((ref.key, dtype))
        if base is None:
            if self._map is None:
                self._map = map_file(self.path)
            offset, nbytes = self._spans[ref.key]
            size = max(BITS[dtype] // 8, 1)
            base = tensor_from_buffer(self._map, offset, nbytes - nbytes % size, dtype)
            self._bases[(ref.key, dtype)] = base
        return base


def is_zip(path: Path) -> bool:
    """Whether ``path`` is a zip archive; a damaged end record is a damaged archive."""
    try:
        return zipfile.is_zipfile(path)
    except (zipfile.BadZipFile, ValueError, EOFError, NotImplementedError) as e:
        raise CorruptCheckpointError(f"{path}: damaged zip archive ({e})") from e


class _Window(io.RawIOBase):
    """Bytes ``[start, start + size)`` of a file, read as a seekable file of their own."""

    def __init__(self, path: Path, start: int, size: int) -> None:
        super().__init__()
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._start, self._size, self._pos = start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError(f"seek before the start of the archive ({base + offset})")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        self._file.seek(self._start + self._pos)
        got = self._file.readinto(memoryview(buffer)[:n]) or 0
        self._pos += got
        return got

    def close(self) -> None:
        self._file.close()
        super().close()


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def _torch_dtype(name: str) -> Any:
    from ._dtypes import to_torch

    return to_torch(name)


def _view_elements(rec: TensorRecord) -> int:
    """Where a legacy storage view starts, in elements of the tensor's dtype."""
    if rec.storage is None:
        return 0
    return rec.storage.view_offset * BITS[rec.storage.dtype] // BITS[rec.dtype]


def _elements(rec: TensorRecord) -> int:
    """Elements of the tensor's dtype its storage holds past the view's start."""
    ref = rec.storage
    if ref is None:
        return 0
    return (ref.numel - ref.view_offset) * BITS[ref.dtype] // BITS[rec.dtype]


def _check_depth(path: Path, tree: Any) -> None:
    """Refuse containers nested deeper than any state dict: the walks after this one build paths."""
    stack = [(tree, 0)]
    seen: set[int] = set()
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list, tuple, Opaque)) or id(node) in seen:
            continue
        if depth > _MAX_DEPTH:
            raise CorruptCheckpointError(
                f"{path}: its objects nest more than {_MAX_DEPTH} levels deep; no state dict does")
        seen.add(id(node))
        kids = (node.values() if isinstance(node, dict) else
                [v for _, v in node.ws_children] if isinstance(node, Opaque) else node)
        stack.extend((k, depth + 1) for k in kids)


def _storage_refs(tree: Any) -> list[StorageRef]:
    refs: dict[str, StorageRef] = {}
    stack = [tree]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, TensorRecord):
            if node.storage is not None:
                refs.setdefault(node.storage.key, node.storage)
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif isinstance(node, Opaque):  # an instance: a placeholder class itself has no children
            stack.extend(v for _, v in node.ws_children)
    return list(refs.values())
