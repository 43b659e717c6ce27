"""Checking a checkpoint before trusting it: what its pickles would run, and whether its bytes are intact.

`scan_globals` lists every global a file's pickles name, read by the opcode interpreter of
`weightsmith.io._pickle` (nothing is imported, constructed or called), each classified as
``allowed`` (on the allowlist), ``data`` (a known plain-data class such as
``argparse.Namespace`` or DCP's metadata dataclasses, built without running its own code) or
``refused``: a real unpickler would call it (``REDUCE``, ``NEWOBJ`` with arguments, a
reconstructor whose base iterates its state, ``APPEND`` on an object, ...), or it is a class
off the allowlist, whose module a real unpickler imports and whose ``__new__`` or
``__setstate__`` it runs. Each call is reported with its opcode and byte offset.

`verify` recomputes checksums: each tensor's CRC-32 against the ``weightsmith.crc32``
metadata that `weightsmith.save` writes into safetensors files, and each member of a torch
zip against the CRC-32 in its central directory (which torch's own reader ignores).

Neither imports torch at module import time.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._result import Result
from .errors import CheckpointNotFoundError, CorruptCheckpointError, UnknownFormatError

__all__ = ["scan_globals", "GlobalsReport", "GlobalUse", "verify", "VerifyReport"]

Progress = Callable[[int, int, str], None]

_MAX_PICKLE = 1 << 30  # larger than any real data.pkl; never read past it
_CHUNK = 16 << 20  # bytes hashed between progress calls
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl", ".pickle")
# zip members torch.save writes that are never pickles
_PLAIN_MEMBERS = ("version", ".format_version", ".storage_alignment", "byteorder", ".data/version",
                  ".data/serialization_id")


# -- scan_globals ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GlobalUse:
    """One global named by a file's pickles.

    Attributes:
        name: the dotted name (``"posix.system"``), as the pickle opcodes spell it.
        status: ``"allowed"``, ``"data"`` (a known plain-data class) or ``"refused"``.
        uses: how the pickles used it: ``allowed``, ``imported`` (only named), ``constructed``
            (instantiated as data: ``cls.__new__(cls)`` and its state), ``called`` (a real
            unpickler would run it, or run code through it), ``code``
            (TorchScript code in the archive), ``unread`` (named in a pickle the restricted
            reader could not follow to its end: counted as refused unless allowlisted).
        where: the pickles naming it (zip member names, ``pickle 2``, ``.metadata``).
        calls: where a real unpickler would run code through it: the opcode, its byte offset
            in the pickle and why (``"REDUCE at byte 57: called"``).
    """

    name: str
    status: str
    uses: tuple[str, ...]
    where: tuple[str, ...]
    calls: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "uses": list(self.uses), "where": list(self.where),
                "calls": list(self.calls)}


@dataclass
class GlobalsReport(Result):
    """Every global a checkpoint's pickles name, and whether loading it would run code."""

    SCHEMA = "weightsmith.globals/1"
    path: str
    format: str
    pickles: list[str]
    globals: list[GlobalUse]
    problems: list[str] = field(default_factory=list)

    @property
    def safe(self) -> bool:
        """No pickle would call code (and the archive carries no TorchScript code)."""
        return not self.refused

    @property
    def refused(self) -> tuple[str, ...]:
        """Globals a real unpickler would call: code execution."""
        return tuple(g.name for g in self.globals if g.status == "refused")

    @property
    def allowed(self) -> tuple[str, ...]:
        """Globals on the allowlist (tensor rebuilds, storages, dtypes, containers)."""
        return tuple(g.name for g in self.globals if g.status == "allowed")

    @property
    def data(self) -> tuple[str, ...]:
        """Classes only instantiated as plain data, or only named; listed, never constructed."""
        return tuple(g.name for g in self.globals if g.status == "data")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["safe"] = self.safe
        return d

    def _rich_(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title=f"globals in {self.path} ({self.format})", title_justify="left")
        for col in ("global", "status", "how used", "in"):
            table.add_column(col, overflow="fold")
        for g in self.globals:
            table.add_row(g.name, g.status, ", ".join(g.uses), ", ".join(g.where))
        verdict = ("safe: no pickle would call code" if self.safe else
                   f"UNSAFE: unpickled for real, it would (or, where 'unread', might) call "
                   f"{', '.join(self.refused)}")
        lines = [f"{len(self.pickles)} pickle(s) read: {', '.join(self.pickles) or 'none'}", verdict]
        lines += [f"  {g.name}: {c}" for g in self.globals for c in g.calls[:3]]
        lines += [f"problem: {p}" for p in self.problems]
        return Group(table, Text("\n".join(lines)))


def scan_globals(path: str | Path, *, progress: Progress | None = None) -> GlobalsReport:
    """List every global the pickles in a checkpoint name, executing nothing.

    Reads a torch zip (``data.pkl``, and every other ``.pkl`` member or pickle hidden under
    another name: TorchScript ``constants.pkl``, stowaways), a legacy torch file (its five
    pickles), a DCP folder's ``.metadata``, a folder of such files, or any pickle file (every
    pickle in it, one after another). A pickle that breaks part-way is listed up to the break.

    Args:
        path: a file or folder.
        progress: called as ``progress(done_bytes, total_bytes, pickle_name)``.

    Returns:
        a `GlobalsReport`; ``report.safe`` is False when any pickle would call code.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        UnknownFormatError: ``path`` is a file holding no pickle at all (a folder without
            pickles is reported with none: it has no globals to list).

    >>> import weightsmith.trust as trust                        # doctest: +SKIP
    >>> trust.scan_globals("model.pt").safe                      # doctest: +SKIP
    True
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"{p}: no such file or folder")
    scan = _Scan(p, progress)
    if p.is_dir():
        fmt = scan.folder(p)
    else:
        fmt = scan.file(p, label_prefix="")
    return GlobalsReport(str(p), fmt, scan.pickles, scan.report(), scan.problems)


class _Scan:
    """Collects globals over the pickles of one or more files."""

    def __init__(self, root: Path, progress: Progress | None) -> None:
        self.root = root
        self.progress = progress
        self.pickles: list[str] = []
        self.problems: list[str] = []
        self.uses: dict[str, set[str]] = {}
        self.where: dict[str, list[str]] = {}
        self.calls: dict[str, list[str]] = {}
        self.total = _size_of(root)
        self.done = 0

    def report(self) -> list[GlobalUse]:
        from .io._pickle import KNOWN_PLAIN, is_allowed

        out = []
        for name, uses in self.uses.items():
            module, _, attr = name.rpartition(".")
            if "called" in uses or "code" in uses:
                status = "refused"
            elif "allowed" in uses or is_allowed(module, attr):
                status = "allowed"
            elif "unread" in uses:
                status = "refused"  # named where the reader could not follow: assume the worst
            elif name in KNOWN_PLAIN:
                status = "data"
            else:
                # off the allowlist: a real unpickler imports its module and builds the object
                # with the class's own __new__/__setstate__, which nothing here can vouch for
                status = "refused"
            out.append(GlobalUse(name, status, tuple(sorted(uses)), tuple(dict.fromkeys(self.where[name])),
                                 tuple(dict.fromkeys(self.calls.get(name, ())))))
        order = {"refused": 0, "data": 1, "allowed": 2}
        return sorted(out, key=lambda g: (order[g.status], g.name))

    def note(self, name: str, how: set[str] | tuple[str, ...], where: str) -> None:
        self.uses.setdefault(name, set()).update(how)
        self.where.setdefault(name, []).append(where)

    def note_scan(self, scan: Any, where: str) -> None:
        for name, how in scan.globals.items():
            self.note(name, how, where)
        for f in scan.findings:
            self.calls.setdefault(f.name, []).append(f"{where}: {f.opcode} at byte {f.position}: {f.why}")

    def step(self, nbytes: int, label: str) -> None:
        self.done += nbytes
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total, label)

    # -- containers -------------------------------------------------------------------------
    def folder(self, folder: Path) -> str:
        from .io.dcp import METADATA_NAME

        found = False
        meta = folder / METADATA_NAME
        if meta.is_file():
            self.file(meta, label_prefix=f"{METADATA_NAME}: ", kind="dcp")
            self.dcp_objects(folder)
            found = True
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.suffix in _PICKLE_SUFFIXES:
                try:
                    self.file(f, label_prefix=f"{f.name}: ")
                except UnknownFormatError as e:  # one stray file does not hide the others
                    self.problems.append(str(e))
                found = True
        if meta.is_file():
            return "dcp"
        if not found:  # safetensors shards, a Hugging Face folder: no pickle, so no globals to list
            return "safetensors folder" if any(folder.glob("*.safetensors")) else "folder"
        return "folder"

    def dcp_objects(self, folder: Path) -> None:
        """The pickles of a DCP folder's non-tensor entries, which ``dcp.load`` unpickles for real.

        torch's load planner reads them with ``torch.load(weights_only=False)``; tensor chunks
        it reads with ``weights_only=True``, so they are left to that guard.
        """
        import zipfile

        from .errors import WeightsmithError
        from .io.dcp import DcpReader
        from .io.torchfile import pickle_limit, zip_layout_problem

        try:
            reader = DcpReader(folder)
        except WeightsmithError as e:  # unsafe or damaged metadata: reported from its own scan
            self.problems.append(f"{folder}: non-tensor entries not scanned ({e})")
            return
        for key, chunk in reader.objects.items():
            if chunk.file is None or chunk.byte_offset is None or chunk.length is None:
                continue
            path = folder / chunk.file  # confined to the folder by the reader
            label = f"{chunk.file}: {key}"
            limit = pickle_limit(path.stat().st_size)
            if chunk.length > limit or chunk.byte_offset + chunk.length > path.stat().st_size:
                self.problems.append(f"{label}: {chunk.length:,} bytes at {chunk.byte_offset:,} lie outside the file")
                continue
            with open(path, "rb") as f:
                f.seek(chunk.byte_offset)
                blob = f.read(chunk.length)
            try:
                with zipfile.ZipFile(io.BytesIO(blob)) as zf:
                    problem = zip_layout_problem(path, zf.namelist())
                    if problem:
                        raise CorruptCheckpointError(f"{label}: {problem}")
                    members = [(i.filename, zf.read(i)) for i in zf.infolist()
                               if i.filename.endswith(".pkl") and i.file_size <= limit]
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, zlib.error) as e:
                self.problems.append(f"{label}: no readable torch.save archive ({e})")
                continue
            for name, data in members:
                self.pickles.append(f"{label}/{name}")
                self._walk(io.BytesIO(data), f"{label}/{name}", count=None)

    def file(self, path: Path, *, label_prefix: str, kind: str | None = None) -> str:
        start = self.done
        fmt = self._file(path, label_prefix, kind)
        self.done = start  # the steps inside counted pickles; the whole file is now done
        self.step(path.stat().st_size, label_prefix + path.name if label_prefix else path.name)
        return fmt

    def _file(self, path: Path, label_prefix: str, kind: str | None) -> str:
        from .io.safetensors import looks_like_safetensors
        from .io.torchfile import is_zip

        with open(path, "rb") as f:
            head = f.read(16)
        if head[:4] == b"PK\x03\x04" and is_zip(path):
            return self.zip(path, label_prefix)
        if looks_like_safetensors(head, path.stat().st_size):
            return "safetensors"  # a JSON header: no pickle to read
        return self.stream(path, label_prefix, kind)

    def zip(self, path: Path, label_prefix: str) -> str:
        import zipfile

        from .io.torchfile import pickle_limit, zip_layout_problem

        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, NotImplementedError) as e:
            raise CorruptCheckpointError(f"{path}: damaged zip archive ({e})") from e
        problem = zip_layout_problem(path, [i.filename for i in infos])
        if problem:
            raise CorruptCheckpointError(problem)
        limit = pickle_limit(path.stat().st_size)
        fmt = "zip"
        for info in infos:
            name = info.filename
            prefix, _, rest = name.partition("/")
            if rest == "data.pkl" and fmt == "zip":
                fmt = "torch"
            if rest == "constants.pkl" or rest.startswith("code/"):
                fmt = "torchscript"
                self.note("torch.jit", ("code",), label_prefix + (f"{prefix}/code/" if rest.startswith("code/")
                                                                  else name))
        with open(path, "rb") as f:
            for info in infos:
                if not self._is_pickle_member(f, info):
                    continue
                label = label_prefix + info.filename
                try:
                    data = _member_bytes(f, info, limit=limit + 1)
                except CorruptCheckpointError as e:
                    self.problems.append(f"{label}: {e}")
                    continue
                if len(data) > limit:
                    raise CorruptCheckpointError(
                        f"{path}: member {info.filename!r} inflates past {limit:,} bytes (the file's size plus "
                        "32 MiB); a checkpoint pickle is never that compressible: refusing a decompression bomb")
                self.pickles.append(label)
                self._walk(io.BytesIO(data), label, count=None)
                self.step(info.compress_size, label)
        return fmt

    def _is_pickle_member(self, f: Any, info: Any) -> bool:
        name = info.filename
        if name.endswith(".pkl"):
            return True
        _, _, rest = name.partition("/")
        if info.is_dir() or rest in _PLAIN_MEMBERS or rest.startswith("data/"):
            return False  # storages are raw bytes, never unpickled
        try:
            head = _member_bytes(f, info, limit=2)
        except CorruptCheckpointError:
            return False
        return len(head) == 2 and head[0] == 0x80 and head[1] <= pickle.HIGHEST_PROTOCOL

    def stream(self, path: Path, label_prefix: str, kind: str | None) -> str:
        from .io.torchfile import LEGACY_MAGIC

        with open(path, "rb") as f:
            named = sum(len(w) for w in self.where.values())
            ok, first = self._walk(f, label_prefix + "pickle 1", count=1)
            if not ok:
                if sum(len(w) for w in self.where.values()) == named:  # nothing read, nothing named
                    self.problems.pop()
                    raise UnknownFormatError(f"{path}: neither a zip, a safetensors file nor a readable pickle")
                self.pickles.append(label_prefix + "pickle 1")
                self.step(f.tell(), label_prefix + "pickle 1")
                return kind or "pickle"
            self.pickles.append(label_prefix + "pickle 1")
            if type(first) is int and first == LEGACY_MAGIC:
                self.pickles[-1] += " (magic)"
                # torch.load reads five pickles (magic, protocol, sys info, objects, storage keys),
                # then raw storage bytes that are no pickle
                names = ("protocol", "sys_info", "objects", "storage keys")
                for i, name in enumerate(names, start=2):
                    label = f"{label_prefix}pickle {i} ({name})"
                    self.pickles.append(label)
                    if not self._walk(f, label, count=1)[0]:
                        break
                self.step(f.tell(), label_prefix + "legacy")
                return "torch-legacy"
            i, label = 2, label_prefix + "pickle 1"
            while f.read(1):
                f.seek(-1, io.SEEK_CUR)
                label = f"{label_prefix}pickle {i}"
                self.pickles.append(label)
                if not self._walk(f, label, count=1)[0]:
                    break
                i += 1
            self.step(f.tell(), label)
        return kind or "pickle"

    def _walk(self, stream: Any, label: str, *, count: int | None) -> tuple[bool, Any]:
        """Scan pickles from ``stream``: whether they read to their end, and the last object.

        Where the restricted reader breaks off, a real unpickler might go on (its objects are
        not the stand-ins), so every global the rest of the opcodes name is listed as well, as
        ``unread``: refused unless allowlisted.
        """
        from .io._pickle import PickleScan, scan_pickles

        start = stream.tell()
        try:
            scan = scan_pickles(stream, count=count)
        except pickle.UnpicklingError as e:
            partial = getattr(e, "scan", None)
            if isinstance(partial, PickleScan):
                self.note_scan(partial, label)
            stream.seek(start)
            for name in _named_globals(stream, count=count):
                self.note(name, ("unread",), label)
            self.problems.append(f"{label}: the restricted reader broke off ({e}); every global its opcodes "
                                 "name is listed, those it could not follow as 'unread'")
            return False, None
        self.note_scan(scan, label)
        return True, (scan.objects[-1] if scan.objects else None)


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
               "SHORT_BINSTRING"}
COMPUTED = "<a name computed at load time>"


def _named_globals(stream: Any, *, count: int | None) -> list[str]:
    """Every global named by the opcodes of ``count`` pickles (all when None), from opcodes alone.

    ``STACK_GLOBAL`` takes its names from the stack; they are known when the two opcodes before
    it (memo stores aside) push strings or fetch memoized strings, else the name is `COMPUTED`.
    """
    import pickletools

    names: list[str] = []
    capped = _Capped(stream, _MAX_PICKLE)
    done = 0
    while count is None or done < count:
        memo: dict[int, str | None] = {}
        top: list[str | None] = []  # what the last opcodes pushed, while that is known
        try:
            for op, arg, _pos in pickletools.genops(capped):
                if op.name in ("GLOBAL", "INST"):
                    module, _, name = str(arg).partition(" ")
                    names.append(f"{module}.{name}")
                    top = []
                elif op.name == "STACK_GLOBAL":
                    pair = top[-2:]
                    names.append(f"{pair[0]}.{pair[1]}" if len(pair) == 2 and None not in pair else COMPUTED)
                    top = []
                elif op.name in ("EXT1", "EXT2", "EXT4"):
                    names.append(f"copyreg extension {arg}")  # a global named by number, not text
                    top = []
                elif op.name in _STRING_OPS:
                    top.append(arg if isinstance(arg, str) else None)
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    top.append(memo.get(arg))
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                    memo[len(memo) if op.name == "MEMOIZE" else arg] = top[-1] if top else None
                elif op.name not in ("PROTO", "FRAME"):
                    top = []
        except (ValueError, EOFError, OverflowError, MemoryError, struct.error):
            break  # where the opcodes themselves end, a real unpickler stops too
        done += 1
        if not capped.read(1):
            break
        capped.seek(-1, io.SEEK_CUR)
    # a real unpickler resolves Python 2 names as the restricted reader does
    return [_python3_name(n) for n in names]


def _python3_name(name: str) -> str:
    import _compat_pickle

    module, _, attr = name.rpartition(".")
    if (module, attr) in _compat_pickle.NAME_MAPPING:
        module, attr = _compat_pickle.NAME_MAPPING[(module, attr)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{attr}" if module else name


class _Capped:
    """A read-only stream that refuses to read more than ``limit`` bytes (bogus opcode lengths)."""

    def __init__(self, stream: Any, limit: int) -> None:
        self._stream, self._left = stream, limit

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            raise ValueError("a pickle opcode declares more bytes than a checkpoint pickle holds")
        data = self._stream.read(n)
        self._left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self._stream.readline(min(self._left, 1 << 20))
        self._left -= len(line)
        return line

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()


def _size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _data_start(f: Any, info: Any) -> int:
    """Offset of a zip member's data, from its local header (torch pads it to align storages)."""
    if info.header_offset < 0:
        raise CorruptCheckpointError(f"zip member {info.filename!r} starts at {info.header_offset}, before the file")
    f.seek(info.header_offset)
    head = f.read(_LOCAL_HEADER.size)
    if len(head) < _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
        raise CorruptCheckpointError(f"zip member {info.filename!r} has a damaged local header")
    fields = _LOCAL_HEADER.unpack(head)
    return info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]


def _member_chunks(f: Any, info: Any, *, limit: int | None = None) -> Iterator[bytes]:
    """A zip member's bytes, uncompressed, chunk by chunk; its CRC is not checked here."""
    import zipfile

    f.seek(_data_start(f, info))
    left = info.compress_size
    inflate = None
    if info.compress_type == zipfile.ZIP_DEFLATED:
        inflate = zlib.decompressobj(-15)
    elif info.compress_type != zipfile.ZIP_STORED:
        raise CorruptCheckpointError(f"zip member {info.filename!r} uses compression method "
                                     f"{info.compress_type}, which is not read")
    produced = 0
    while left > 0:
        raw = f.read(min(left, _CHUNK))
        if not raw:
            raise CorruptCheckpointError(f"zip member {info.filename!r} runs past the end of the file (truncated?)")
        left -= len(raw)
        for chunk in ([raw] if inflate is None else _inflated(inflate, raw, info.filename)):
            if limit is not None and produced + len(chunk) >= limit:
                yield chunk[: limit - produced]
                return
            produced += len(chunk)
            yield chunk


def _inflated(inflate: Any, raw: bytes, name: str) -> Iterator[bytes]:
    """Inflate ``raw`` at most one chunk at a time: a small member may inflate to gigabytes."""
    data = raw
    try:
        while data:
            out = inflate.decompress(data, _CHUNK)
            data = inflate.unconsumed_tail
            if not out and data:  # pragma: no cover - zlib always progresses when given room
                break
            yield out
    except zlib.error as e:
        raise CorruptCheckpointError(f"zip member {name!r} cannot be inflated ({e})") from e


def _member_bytes(f: Any, info: Any, *, limit: int) -> bytes:
    return b"".join(_member_chunks(f, info, limit=limit))


# -- verify ---------------------------------------------------------------------------------------
@dataclass
class VerifyReport(Result):
    """Whether a checkpoint's bytes are the bytes that were written, by their recorded checksums.

    Attributes:
        method: what was compared: ``"weightsmith.crc32"`` (a CRC-32 per tensor, written by
            `weightsmith.save`), ``"zip crc32"`` (each member of a torch zip against its central
            directory) or ``"none"`` (the file records no checksums).
        checked: tensors or members whose checksum was recomputed.
        mismatched: key or member -> what differs.
        unchecked: keys with no recorded checksum.
    """

    SCHEMA = "weightsmith.verify/1"
    path: str
    format: str
    method: str
    checked: int
    nbytes: int
    mismatched: dict[str, str] = field(default_factory=dict)
    unchecked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No recomputed checksum differs from the recorded one."""
        return not self.mismatched

    @property
    def has_checksums(self) -> bool:
        """Whether anything could be checked at all."""
        return self.checked > 0

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["ok"] = self.ok
        return d

    def _rich_(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        parts: list[Any] = []
        if self.mismatched:
            table = Table(title=f"checksum mismatches in {self.path}", title_justify="left")
            table.add_column("key or member", overflow="fold")
            table.add_column("problem", overflow="fold")
            for key, why in self.mismatched.items():
                table.add_row(key, why)
            parts.append(table)
        if not self.has_checksums:
            line = f"{self.path}: no checksums recorded ({self.format}); nothing to verify"
        elif self.ok:
            line = f"{self.path}: all {self.checked} checksums match ({self.method}, {self.nbytes:,} bytes read)"
        else:
            line = (f"{self.path}: {len(self.mismatched)} of {self.checked} checksums differ ({self.method}); "
                    "the file changed after it was written")
        lines = [line]
        if self.unchecked:
            lines.append(f"{len(self.unchecked)} key(s) without a recorded checksum, e.g. {self.unchecked[0]}")
        lines += self.notes
        parts.append(Text("\n".join(lines)))
        return Group(*parts)


def verify(path: str | Path, *, progress: Progress | None = None) -> VerifyReport:
    """Recompute a checkpoint's checksums and compare them with the recorded ones.

    Safetensors files and sharded folders written by `weightsmith.save` carry a CRC-32 per
    tensor; each tensor is read (memory-mapped, one at a time) and hashed. Torch zip files carry
    a CRC-32 per member in the zip directory, which ``torch.load`` never checks; each member is
    read in chunks and hashed. Other files record nothing to compare: the report says
    "no checksums recorded".

    Args:
        path: a file or folder.
        progress: called as ``progress(done_bytes, total_bytes, key_or_member)``.

    Returns:
        a `VerifyReport`; ``report.ok`` is False when any checksum differs.

    Raises:
        CheckpointError: the file cannot be opened at all (its header is damaged, ...).

    >>> import weightsmith, weightsmith.trust as trust           # doctest: +SKIP
    >>> weightsmith.save(model, "m.safetensors")                 # doctest: +SKIP
    >>> trust.verify("m.safetensors").ok                         # doctest: +SKIP
    True
    """
    from .io import detect
    from .io.torchfile import is_zip

    kind, target = detect(path)
    if kind == "torch" and is_zip(target):
        return _verify_zip(target, progress)
    if kind == "torch":
        return VerifyReport(str(path), "torch-legacy", "none", 0, 0,
                            notes=["no checksums recorded: legacy torch files carry none"])
    if kind == "dcp":
        return VerifyReport(str(path), "dcp", "none", 0, 0,
                            notes=["no checksums recorded: torch.distributed.checkpoint folders carry none"])
    return _verify_tensors(Path(path), progress)


def _verify_tensors(path: Path, progress: Progress | None) -> VerifyReport:
    """Safetensors files and sharded folders: a CRC-32 per tensor from the metadata."""
    from .checkpoint import open as open_checkpoint
    from .io.safetensors import CHECKSUMS_KEY, SafetensorsReader, tensor_bytes

    ckpt = open_checkpoint(path)
    readers = ckpt.reader.shards if ckpt.format == "sharded" else {path.name: ckpt.reader}
    recorded: dict[str, str] = {}
    notes: list[str] = []
    mismatched: dict[str, str] = {}
    zip_shards: list[Path] = []
    unchecked: list[str] = []
    for name, reader in readers.items():
        if not isinstance(reader, SafetensorsReader):
            zip_shards.append(Path(reader.path))  # torch shards: checked by their zip CRCs below
            continue
        crcs = _recorded(reader.metadata.get(CHECKSUMS_KEY))
        if crcs is None:
            mismatched[f"{name}:{CHECKSUMS_KEY}"] = "the checksum metadata itself is damaged"
            crcs = {}
        recorded.update(crcs)
        aliases = reader.aliases()  # tied keys: stored, and checked, once
        unchecked += sorted(k for k in reader.infos if k not in crcs and k not in aliases)
    total = sum(ckpt[k].nbytes for k in recorded if k in ckpt)
    done = 0
    for key, want in recorded.items():
        if key not in ckpt:
            mismatched[key] = "has a recorded checksum but is not in the file"
            continue
        crc = 0
        view = memoryview(tensor_bytes(key, ckpt.tensor(key)))
        for start in range(0, len(view), _CHUNK):
            crc = zlib.crc32(view[start:start + _CHUNK], crc)
            if progress is not None:
                progress(done + min(start + _CHUNK, len(view)), total, key)
        done += len(view)
        got = f"{crc & 0xFFFFFFFF:08x}"
        if got != want.lower():
            mismatched[key] = f"CRC-32 {got}, recorded {want}"
    ckpt.close()
    checked = len(recorded)
    nbytes = done
    for shard in zip_shards:
        sub = _verify_zip(shard, progress)
        checked += sub.checked
        nbytes += sub.nbytes
        mismatched.update({f"{shard.name}:{k}": v for k, v in sub.mismatched.items()})
    method = "weightsmith.crc32" if recorded else ("zip crc32" if zip_shards else "none")
    if not checked:
        notes.append("no checksums recorded: save with weightsmith.save(..., checksums=True) to get them")
    return VerifyReport(str(path), ckpt.format, method, checked, nbytes, mismatched, unchecked, notes)


def _recorded(text: str | None) -> dict[str, str] | None:
    """The ``weightsmith.crc32`` metadata as {key: hex}; {} when absent, None when damaged."""
    if text is None:
        return {}
    try:
        crcs = json.loads(text)
    except (ValueError, RecursionError):  # nested past the parser's depth: damaged, not a crash
        return None
    if not isinstance(crcs, dict) or not all(isinstance(v, str) for v in crcs.values()):
        return None
    return crcs


def _verify_zip(path: Path, progress: Progress | None) -> VerifyReport:
    """A torch zip: each member's CRC-32 against the central directory."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, NotImplementedError) as e:
        raise CorruptCheckpointError(f"{path}: damaged zip archive ({e})") from e
    total = sum(i.compress_size for i in infos)
    done = 0
    mismatched: dict[str, str] = {}
    with open(path, "rb") as f:
        for info in infos:
            crc = 0
            size = 0
            try:
                for chunk in _member_chunks(f, info):
                    crc = zlib.crc32(chunk, crc)
                    size += len(chunk)
                    if progress is not None:
                        progress(min(done + size, total), total, info.filename)
            except CorruptCheckpointError as e:
                mismatched[info.filename] = str(e)
                continue
            finally:
                done += info.compress_size
            if crc & 0xFFFFFFFF != info.CRC:
                mismatched[info.filename] = f"CRC-32 {crc & 0xFFFFFFFF:08x}, zip directory says {info.CRC:08x}"
            elif size != info.file_size:
                mismatched[info.filename] = f"{size:,} bytes, zip directory says {info.file_size:,}"
    _name_tensors(path, mismatched)
    return VerifyReport(str(path), "torch", "zip crc32", len(infos), done, mismatched)


def _name_tensors(path: Path, mismatched: dict[str, str]) -> None:
    """Add the tensor keys stored in each damaged storage member, where the file can be read safely."""
    if not any("/data/" in m for m in mismatched):
        return
    from .errors import WeightsmithError
    from .io.torchfile import TorchFileReader

    try:
        reader = TorchFileReader(path)
    except (WeightsmithError, OSError):
        return
    by_storage: dict[str, list[str]] = {}
    for key, rec in reader._records.items():  # noqa: SLF001 - storage keys are not in TensorInfo
        if rec.storage is not None:
            by_storage.setdefault(rec.storage.key, []).append(key)
    for member in list(mismatched):
        storage = member.rsplit("/data/", 1)[-1] if "/data/" in member else None
        keys = by_storage.get(storage or "", [])
        if keys:
            mismatched[member] += f" (tensors: {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})"
