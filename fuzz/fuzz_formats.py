"""Fuzz weightsmith's readers with damaged and doctored checkpoint files.

Each case starts from a real file (a safetensors file written by `weightsmith.save`, a
``torch.save`` zip, a legacy ``torch.save`` file) and damages it: byte flips, truncation,
spliced bytes, safetensors header edits (huge or negative shapes and offsets, unknown dtypes,
non-string metadata, duplicate keys, a wrong length prefix), edits of the opcodes of a torch
``data.pkl`` (ints, strings, globals, inserted and deleted opcodes), and zip-level edits
(members dropped, duplicated, compressed). Then `weightsmith.open`, ``Checkpoint.load()``
(touching every tensor's bytes), `weightsmith.trust.verify` and `scan_globals` must each
succeed or raise a `WeightsmithError`: never another exception, never a hang. Some files are
whole but cut short while open: they must then fail, or load the values they held.

Cases run in a worker process (`Worker`) under an address-space cap (`memory_limit`: 2x the
file + 256 MiB) and a time limit (`time_limit`, linear in the file's size); a worker that
crashes or hangs is counted and replaced.

    python fuzz/fuzz_formats.py --cases 10000 [--seed 0] [--found fuzz/found]

Prints the number of cases, how many opened fine, how many gave a WeightsmithError, the
uncaught exceptions, wrong values, hangs and crashes (all must be 0) with one example of each
kind, the worst time and the peak memory of one case. Failing inputs are kept under --found.
The test suite imports `cases` and `Worker` from here for a short run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickletools
import resource
import signal
import struct
import sys
import tempfile
import time
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

# -- the real files the cases start from ----------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One fuzz input: a file's bytes, the suffix it is saved with, and what was done to it.

    With ``cut``, the file is whole when opened and is cut to ``cut`` bytes while open.
    """

    suffix: str
    data: bytes
    how: str
    cut: int | None = None

    def __repr__(self) -> str:  # hypothesis prints failing examples; keep it short
        return f"Case({self.suffix}, {len(self.data)} bytes, {self.how})"


@lru_cache(maxsize=1)
def bases() -> dict[str, bytes]:
    """The undamaged files: safetensors (with a tie and metadata), torch zip, legacy torch."""
    import argparse as _argparse

    import torch

    import weightsmith

    torch.manual_seed(0)
    shared = torch.randn(3, 4)
    state = {"enc.weight": shared, "dec.weight": shared, "enc.bias": torch.randn(4).to(torch.bfloat16),
             "steps": torch.tensor([7], dtype=torch.int64), "mask": torch.tensor([True, False, True])}
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        weightsmith.save(state, path, metadata={"note": "fuzz base"})
        out["safetensors"] = path.read_bytes()
        nested = {"state_dict": state, "epoch": 3, "args": _argparse.Namespace(lr=0.1), "ema": {"w": shared}}
        buf = io.BytesIO()
        torch.save(nested, buf)
        out["torch"] = buf.getvalue()
        buf = io.BytesIO()
        torch.save(state, buf, _use_new_zipfile_serialization=False)
        out["legacy"] = buf.getvalue()
    return out


_SUFFIX = {"safetensors": ".safetensors", "torch": ".pt", "legacy": ".pt"}


# -- byte-level damage ------------------------------------------------------------------------------
@st.composite
def flips(draw: Any) -> Case:
    kind = draw(st.sampled_from(sorted(bases())))
    data = bytearray(bases()[kind])
    n = draw(st.integers(1, 8))
    for _ in range(n):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] ^= draw(st.integers(1, 255))
    return Case(_SUFFIX[kind], bytes(data), f"{kind}: {n} byte flip(s)")


@st.composite
def truncations(draw: Any) -> Case:
    kind = draw(st.sampled_from(sorted(bases())))
    data = bases()[kind]
    n = draw(st.integers(0, len(data) - 1))
    return Case(_SUFFIX[kind], data[:n], f"{kind}: truncated to {n} bytes")


@st.composite
def splices(draw: Any) -> Case:
    kind = draw(st.sampled_from(sorted(bases())))
    data = bases()[kind]
    at = draw(st.integers(0, len(data)))
    cut = draw(st.integers(0, 64))
    insert = draw(st.binary(max_size=64))
    return Case(_SUFFIX[kind], data[:at] + insert + data[at + cut:],
                f"{kind}: {cut} bytes at {at} replaced by {len(insert)}")


# -- safetensors header edits -----------------------------------------------------------------------
def _split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


_INTS = st.one_of(st.integers(-2, 64), st.sampled_from([-1, 2**31, 2**32, 2**62, 2**63, 2**64, 2**70, -(2**63)]),
                  st.integers(-(2**80), 2**80))
_JSON_SCALARS = st.one_of(st.none(), st.booleans(), _INTS, st.floats(allow_nan=False), st.text(max_size=12))
_JSON = st.recursive(_JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                     max_leaves=8)
_DTYPES = st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F64", "C64", "C128",
                                     "F8_E4M3", "F8_E5M2", "F4", "F6_E2M3", "I4", "f32", "float32", "", "F 32"]),
                    st.text(max_size=8), _JSON_SCALARS)


@st.composite
def header_edits(draw: Any) -> Case:
    header, body = _split_safetensors(bases()["safetensors"])
    keys = [k for k in header if k != "__metadata__"]
    done: list[str] = []
    raw_prefix: bytes | None = None
    duplicate = False
    deep = 0
    for _ in range(draw(st.integers(1, 3))):
        edit = draw(st.sampled_from(["shape", "offsets", "dtype", "metadata", "ties", "crc", "drop", "extra",
                                     "duplicate", "entry", "prefix", "body", "not-object", "deep"]))
        key = draw(st.sampled_from(keys))
        entry = header.get(key)
        if edit == "shape" and isinstance(entry, dict):
            entry["shape"] = draw(st.one_of(st.lists(_INTS, max_size=6), _JSON))
        elif edit == "offsets" and isinstance(entry, dict):
            entry["data_offsets"] = draw(st.one_of(st.lists(_INTS, min_size=2, max_size=2),
                                                   st.lists(_INTS, max_size=3), _JSON))
        elif edit == "dtype" and isinstance(entry, dict):
            entry["dtype"] = draw(_DTYPES)
        elif edit == "metadata":
            header["__metadata__"] = draw(st.one_of(
                st.dictionaries(st.text(max_size=16), _JSON, max_size=4), _JSON))
        elif edit == "ties":
            meta = header.setdefault("__metadata__", {})
            if isinstance(meta, dict):
                ties = draw(st.dictionaries(st.sampled_from([*keys, "x", "enc.weight"]),
                                            st.one_of(st.sampled_from(keys), _JSON), max_size=3))
                meta["weightsmith.ties"] = draw(st.one_of(st.just(json.dumps(ties)), st.text(max_size=20)))
        elif edit == "crc":
            meta = header.setdefault("__metadata__", {})
            if isinstance(meta, dict):
                meta["weightsmith.crc32"] = draw(st.one_of(
                    st.text(max_size=30),
                    st.just(json.dumps({k: draw(st.one_of(st.text(max_size=9), _JSON)) for k in keys}))))
        elif edit == "drop" and isinstance(entry, dict) and entry:
            entry.pop(draw(st.sampled_from(sorted(entry))))
        elif edit == "extra" and isinstance(entry, dict):
            entry[draw(st.text(max_size=8))] = draw(_JSON)
        elif edit == "duplicate":
            duplicate = True
        elif edit == "entry":
            header[draw(st.text(max_size=12))] = draw(st.one_of(
                st.fixed_dictionaries({"dtype": _DTYPES, "shape": st.lists(_INTS, max_size=4),
                                       "data_offsets": st.lists(_INTS, min_size=2, max_size=2)}), _JSON))
        elif edit == "prefix":
            raw_prefix = struct.pack("<Q", draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 4096))))
        elif edit == "body":
            body = body[: draw(st.integers(0, len(body)))] + draw(st.binary(max_size=16))
        elif edit == "deep":  # nesting past the JSON parser's recursion limit, or just under it
            depth = draw(st.sampled_from([500, 5_000, 100_000]))
            header[key] = "\x00deep"
            deep = depth
        elif edit == "not-object":
            header = draw(_JSON)  # type: ignore[assignment]
            keys = keys or ["x"]
        done.append(edit)
        if not isinstance(header, dict):
            break
    text = json.dumps(header)
    if duplicate and isinstance(header, dict) and keys and text.startswith("{"):
        key = keys[0]
        text = "{" + json.dumps(key) + ":" + json.dumps(header.get(key)) + "," + text[1:]
    if deep:
        text = text.replace(json.dumps("\x00deep"), "[" * deep + "]" * deep)
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    prefix = raw_prefix if raw_prefix is not None else struct.pack("<Q", len(raw))
    return Case(".safetensors", prefix + raw + body, "safetensors header: " + ", ".join(done))


# -- torch zip: opcode edits of data.pkl, and member edits --------------------------------------------
def _members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def _rezip(members: list[tuple[str, bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate member names are a case, not a mistake
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data, method in members:
                zf.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return buf.getvalue()


_GLOBALS = [b"torch\nFloatStorage", b"torch\nHalfStorage", b"torch\nBFloat16Storage", b"torch\nLongStorage",
            b"torch\nBoolStorage", b"torch\nQInt8Storage", b"torch\nUntypedStorage", b"torch\nfloat32",
            b"torch\nNoSuchStorage", b"torch._utils\n_rebuild_tensor_v2", b"torch._utils\n_rebuild_tensor",
            b"torch._utils\n_rebuild_parameter", b"torch._utils\n_rebuild_meta_tensor_no_storage",
            b"torch._tensor\n_rebuild_from_type_v2", b"collections\nOrderedDict", b"__builtin__\nset",
            b"builtins\nslice", b"builtins\ncomplex", b"copy_reg\n_reconstructor", b"torch\nSize",
            b"torch\ndevice", b"_codecs\nencode", b"argparse\nNamespace", b"pathlib\nPosixPath"]
_INSERTS = [b"N", b")", b"}", b"]", b"(", b"0", b"1", b"2", b"t", b"R", b"b", b"s", b"u", b"e", b"a", b"Q",
            b"\x88", b"\x89", b"K\x05", b"h\x00", b"h\x01", b"h\x07", b"\x85", b"\x86", b"\x87", b"l", b"d",
            b"\x94", b"\x81", b"\x93", b"X\x01\x00\x00\x000", b"J\xff\xff\xff\xff"]
_INT_OPS = {"BININT1", "BININT2", "BININT", "LONG1", "INT", "LONG", "LONG4"}
_STR_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "UNICODE", "BINSTRING", "SHORT_BINSTRING"}


def _long1(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 8) // 8 or 1, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw if len(raw) < 256 else b"\x8b" + struct.pack("<i", len(raw)) + raw


@st.composite
def pickle_edits(draw: Any) -> Case:
    members = _members(bases()["torch"])
    index = next(i for i, (n, _) in enumerate(members) if n.endswith("/data.pkl"))
    pkl = members[index][1]
    ops = [(op.name, arg, pos) for op, arg, pos in pickletools.genops(pkl)]
    done = []
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(ops) - 1))
        name, _arg, start = ops[i]
        end = ops[i + 1][2] if i + 1 < len(ops) else len(pkl)
        edit = draw(st.sampled_from(["int", "string", "global", "delete", "duplicate", "insert"]))
        ints = [j for j, op in enumerate(ops[:-1]) if op[0] in _INT_OPS]
        strs = [j for j, op in enumerate(ops[:-1]) if op[0] in _STR_OPS]
        globs = [j for j, op in enumerate(ops[:-1]) if op[0] == "GLOBAL"]
        if edit in ("int", "string", "global") and not {"int": ints, "string": strs, "global": globs}[edit]:
            edit = "insert"
        if edit == "int":
            i = draw(st.sampled_from(ints))
            start, end = ops[i][2], ops[i + 1][2]
            new = _long1(draw(_INTS))
        elif edit == "string":
            i = draw(st.sampled_from(strs))
            start, end = ops[i][2], ops[i + 1][2]
            text = draw(st.one_of(st.sampled_from(["storage", "0", "1", "99", "cpu", "cuda:0", "meta", "", "..",
                                                   "../../etc/passwd", "data.pkl", "float32", "FloatStorage"]),
                                  st.text(max_size=10))).encode("utf-8", "surrogatepass")
            new = b"X" + struct.pack("<I", len(text)) + text
        elif edit == "global":
            i = draw(st.sampled_from(globs))
            start, end = ops[i][2], ops[i + 1][2]
            new = b"c" + draw(st.sampled_from(_GLOBALS)) + b"\n"
        elif edit == "delete":
            new = b""
        elif edit == "duplicate":
            new = pkl[start:end] * 2
        else:
            new = draw(st.sampled_from(_INSERTS)) + pkl[start:end]
        pkl = pkl[:start] + new + pkl[end:]
        done.append(f"{edit} {name}")
        try:
            ops = [(op.name, arg, pos) for op, arg, pos in pickletools.genops(pkl)]
        except Exception:  # noqa: BLE001 - a broken opcode stream is the point; stop editing it
            break
    members[index] = (members[index][0], pkl)
    return Case(".pt", _rezip([(n, d, zipfile.ZIP_STORED) for n, d in members]), "data.pkl: " + ", ".join(done))


@st.composite
def zip_edits(draw: Any) -> Case:
    members = [(n, d, zipfile.ZIP_STORED) for n, d in _members(bases()["torch"])]
    done = []
    for _ in range(draw(st.integers(1, 3))):
        edit = draw(st.sampled_from(["drop", "duplicate", "deflate", "extra", "rename", "resize", "reorder"]))
        i = draw(st.integers(0, len(members) - 1))
        name, data, method = members[i]
        if edit == "drop" and len(members) > 1:
            members.pop(i)
        elif edit == "duplicate":
            members.insert(draw(st.integers(0, len(members))), (name, draw(st.sampled_from([data, b"", data[:1]])),
                                                                 method))
        elif edit == "deflate":
            members[i] = (name, data, zipfile.ZIP_DEFLATED)
        elif edit == "extra":
            members.append((draw(st.sampled_from(["archive/extra.pkl", "archive/data/9", "archive/code/x.py",
                                                  "other/data.pkl", "archive/constants.pkl", "archive/../x"])),
                            draw(st.binary(max_size=32)), zipfile.ZIP_STORED))
        elif edit == "rename":
            members[i] = (draw(st.sampled_from(["archive/data.pkl", "a/b/data.pkl", "data.pkl", "archive/data/0",
                                                "archive/byteorder", name + "x"])), data, method)
        elif edit == "resize":
            members[i] = (name, data[: draw(st.integers(0, len(data)))] + draw(st.binary(max_size=8)), method)
        elif edit == "reorder":
            members.reverse()
        done.append(f"{edit} {name}")
    return Case(".pt", _rezip(members), "zip: " + ", ".join(done))


# -- torch zips written from scratch: tensors whose views disagree with their storages ---------------
_STORAGES = {"FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8, "BoolStorage": 1,
             "ByteStorage": 1, "DoubleStorage": 8, "ComplexFloatStorage": 8, "UntypedStorage": 1, "IntStorage": 4}
_SMALL = st.one_of(st.integers(-3, 24), _INTS)


def _p_str(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _p_tuple(items: list[int]) -> bytes:
    return b"(" + b"".join(_long1(i) for i in items) + b"t"


@st.composite
def tensor_pickles(draw: Any) -> Case:
    """A ``data.pkl`` of tensors over storages, written from scratch; cycles and shared dicts too.

    Half the tensors are consistent with their storages except for at most one number nudged by
    one (the boundaries of the extent checks); the rest have every number drawn freely.
    """
    n = draw(st.integers(1, 4))
    storages: dict[str, tuple[int, int]] = {}  # key -> (bytes, numel)
    body = b"\x80\x02}q\x00("
    for i in range(n):
        key = draw(st.sampled_from(["0", "1", "2"]))
        stype = draw(st.sampled_from(sorted(_STORAGES)))
        ndim = draw(st.integers(0, 3))
        if draw(st.booleans()):
            shape = draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim))
            stride = [1] * ndim
            for d in range(ndim - 2, -1, -1):
                stride[d] = stride[d + 1] * max(shape[d + 1], 1)
            offset = draw(st.integers(0, 2))
            count = 1
            for d in shape:
                count *= d
            numel = offset + count
            nums = [numel, offset, *shape, *stride]
            if draw(st.booleans()):
                j = draw(st.integers(0, len(nums) - 1))
                nums[j] += draw(st.sampled_from([-1, 1]))
            numel, offset, shape, stride = nums[0], nums[1], nums[2:2 + ndim], nums[2 + ndim:]
        else:
            numel, offset = draw(_SMALL), draw(_SMALL)
            shape = draw(st.lists(_SMALL, min_size=ndim, max_size=ndim))
            stride = draw(st.lists(_SMALL, min_size=ndim, max_size=ndim))
        storages.setdefault(key, (max(0, min(numel, 1 << 12)) * _STORAGES[stype], numel))
        pid = (b"(" + _p_str("storage") + b"ctorch\n" + stype.encode() + b"\n" + _p_str(key) + _p_str("cpu")
               + _long1(numel) + b"tQ")
        body += (_p_str(f"t{i}") + b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + _long1(offset)
                 + _p_tuple(shape) + _p_tuple(stride) + b"\x89ccollections\nOrderedDict\n)RtR")
    if draw(st.booleans()):
        body += _p_str("self") + b"h\x00"  # the dict inside itself
    if draw(st.booleans()):  # a dict shared under two names, nested: 2**depth paths
        depth = draw(st.integers(1, 40))
        body += _p_str("tree") + b"}q\x01" + _p_str("w") + b"h\x00s0"  # memoized, popped
        for level in range(depth):
            body += (b"}q" + bytes([2 + level]) + b"(" + _p_str("a") + b"h" + bytes([1 + level]) + _p_str("b")
                     + b"h" + bytes([1 + level]) + b"u" + (b"0" if level < depth - 1 else b""))
    body += b"u."
    members = [("archive/data.pkl", body, zipfile.ZIP_STORED), ("archive/byteorder", b"little", zipfile.ZIP_STORED)]
    for key, (nbytes, _numel) in storages.items():
        size = draw(st.one_of(st.just(nbytes), st.just(max(nbytes - 1, 0)), st.integers(0, 64)))
        members.append((f"archive/data/{key}", bytes(size), zipfile.ZIP_STORED))
    return Case(".pt", _rezip(members), f"written data.pkl: {n} tensor(s) over {len(storages)} storage(s)")


# -- folders: sharded (index + shards) and DCP (.metadata + data files) ------------------------------
FOLDER = "/"  # the suffix of a folder case, whose data is a zip of the folder's files


@lru_cache(maxsize=1)
def folder_bases() -> dict[str, list[tuple[str, bytes]]]:
    """The undamaged folders, as (name, bytes) lists: a sharded folder and a DCP folder."""
    import torch

    import weightsmith

    torch.manual_seed(0)
    state = {"a.weight": torch.randn(4, 4), "a.bias": torch.randn(4), "b.weight": torch.randn(2, 4),
             "steps": torch.tensor([7])}
    out = {}
    with tempfile.TemporaryDirectory() as d:
        weightsmith.save(state, Path(d) / "sharded", max_shard_size=100)
        weightsmith.save(state, Path(d) / "dcp", format="dcp")
        for kind in ("sharded", "dcp"):
            out[kind] = [(f.name, f.read_bytes()) for f in sorted((Path(d) / kind).iterdir())]
    return out


def _zip_folder(files: list[tuple[str, bytes]]) -> bytes:
    return _rezip([(n, data, zipfile.ZIP_STORED) for n, data in files])


_SHARD_NAMES = st.sampled_from(["model.safetensors.index.json", "other.index.json", "../escape.safetensors",
                                "/etc/passwd", "", ".", "sub/", "missing.safetensors", ".metadata",
                                "model-00001-of-00002.safetensors"])


@st.composite
def folder_edits(draw: Any) -> Case:
    """A sharded or DCP folder with one member damaged, or its index pointed somewhere odd."""
    kind = draw(st.sampled_from(["sharded", "dcp"]))
    files = [list(f) for f in folder_bases()[kind]]
    i = draw(st.integers(0, len(files) - 1))
    name, data = files[i]
    edit = draw(st.sampled_from(["flip", "truncate", "splice", "drop", "index"]))
    if edit == "index" and kind == "sharded":
        index = json.loads(next(d for n, d in files if n.endswith(".index.json")))
        key = draw(st.sampled_from(sorted(index["weight_map"])))
        index["weight_map"][key] = draw(st.one_of(_SHARD_NAMES, st.text(max_size=12), _JSON))
        if draw(st.booleans()):  # a second index naming the first: a cycle
            files.append(["other.index.json", json.dumps({"weight_map": {key: "model.safetensors.index.json"}})
                          .encode()])
        files = [[n, json.dumps(index).encode() if n.endswith(".index.json") and n != "other.index.json" else d]
                 for n, d in files]
        how = f"sharded: {key!r} mapped to {index['weight_map'][key]!r:.40}"
    elif edit in ("flip", "index"):
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            pos = draw(st.integers(0, max(len(buf) - 1, 0)))
            if buf:
                buf[pos] ^= draw(st.integers(1, 255))
        files[i][1] = bytes(buf)
        how = f"{kind}: bytes of {name} flipped"
    elif edit == "truncate":
        files[i][1] = data[:draw(st.integers(0, max(len(data) - 1, 0)))]
        how = f"{kind}: {name} truncated to {len(files[i][1])} bytes"
    elif edit == "splice":
        at = draw(st.integers(0, len(data)))
        files[i][1] = data[:at] + draw(st.binary(max_size=32)) + data[at + draw(st.integers(0, 32)):]
        how = f"{kind}: bytes of {name} spliced at {at}"
    else:
        del files[i]
        how = f"{kind}: {name} removed"
    return Case(FOLDER, _zip_folder([(n, d) for n, d in files]), how)


@st.composite
def cuts_while_open(draw: Any) -> Case:
    """A whole file, opened and read, then cut short while still open."""
    kind = draw(st.sampled_from(sorted(bases())))
    data = bases()[kind]
    n = draw(st.integers(0, len(data) - 1))
    return Case(_SUFFIX[kind], data, f"{kind}: cut to {n} bytes while open", cut=n)


def cases() -> st.SearchStrategy[Case]:
    """Every kind of damaged file, mixed."""
    return st.one_of(flips(), truncations(), splices(), header_edits(), pickle_edits(), zip_edits(),
                     tensor_pickles(), cuts_while_open(), folder_edits())


# -- running one case -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """What one case did.

    ``kind``: ``ok`` (opened and loaded), ``error`` (a WeightsmithError), ``uncaught`` (any other
    exception, ``MemoryError`` past the memory cap included), ``wrong`` (a file cut while open
    loaded other values than it held), ``hang`` (past its time limit) or ``crash`` (the process
    died, e.g. SIGBUS). ``seconds`` and ``peak_mib`` (peak resident memory above the level before
    the case) are measured in the worker; 0 where it died.
    """

    kind: str
    detail: str = ""
    seconds: float = 0.0
    peak_mib: float = 0.0


FAILURES = ("uncaught", "wrong", "hang", "crash")


def time_limit(size: int) -> float:
    """Seconds a case of ``size`` bytes may take: linear in the size, generous for a busy machine."""
    return 10.0 + size / 2**20


def memory_limit(size: int) -> int:
    """Bytes of address space a case of ``size`` bytes may add: 2x the file + 256 MiB."""
    return 2 * size + (256 << 20)


class _Hang(Exception):
    pass


def _alarm(_signum: int, _frame: Any) -> None:
    raise _Hang


def _where(error: BaseException) -> str:
    """The innermost frame of the weightsmith package in the error's traceback."""
    import traceback

    frames = [f for f in traceback.extract_tb(error.__traceback__) if "weightsmith" in f.filename]
    frame = frames[-1] if frames else traceback.extract_tb(error.__traceback__)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}"


def _bytes_of(tensor: Any) -> bytes:
    """A tensor's bytes, whatever its dtype (NaN compares equal to itself here)."""
    import torch

    flat = torch.empty(tensor.numel(), dtype=tensor.dtype)  # a fresh stride-1 copy, whatever the view
    flat.copy_(tensor.detach().reshape(-1))
    return bytes(flat.view(torch.uint8).numpy()) if flat.numel() else b""


def run_case(case: Case, folder: Path, *, timeout_s: int = 10) -> Outcome:
    """Open, load, verify and scan one damaged file; classify what happened.

    Runs in the calling process: a crash kills it. `Worker` runs cases in a child instead.
    """
    import os

    import weightsmith
    from weightsmith.errors import WeightsmithError
    from weightsmith.trust import scan_globals, verify

    if case.suffix == FOLDER:  # a new folder each time; its files come zipped
        import shutil

        path = folder / "case_dir"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        with zipfile.ZipFile(io.BytesIO(case.data)) as zf:
            for info in zf.infolist():
                (path / info.filename).write_bytes(zf.read(info))
    else:
        path = folder / f"case{case.suffix}"
        path.unlink(missing_ok=True)  # a new file each time: maps of the last one stay its own
        path.write_bytes(case.data)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout_s)
    opened = False
    try:
        try:
            with weightsmith.open(path) as ckpt:
                _ = (len(ckpt), repr(ckpt), ckpt.other_objects, ckpt.ties, ckpt.metadata)
                whole = {key: _bytes_of(tensor) for key, tensor in ckpt.load().items()}  # every byte touched
                if case.cut is not None:
                    os.truncate(path, case.cut)
                    wrong = [k for k, t in ckpt.load().items() if _bytes_of(t) != whole[k]]
                    if wrong:
                        return Outcome("wrong", f"{wrong[0]!r} changed after the cut [{case.how}]")
            opened = True
        except WeightsmithError:
            pass
        for check in (verify, scan_globals):
            with contextlib.suppress(WeightsmithError):
                check(path)
    except _Hang:
        return Outcome("hang", case.how)
    except Exception as e:  # noqa: BLE001 - anything else is the finding
        return Outcome("uncaught", f"{type(e).__name__} at {_where(e)}: {str(e)[:160]} [{case.how}]")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return Outcome("ok" if opened else "error")


# -- running cases in a child process ------------------------------------------------------------------
def _status(field: str) -> int:
    """A ``/proc/self/status`` figure in bytes (0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> None:
    """Reset this process's peak resident memory (Linux: ``clear_refs`` 5), so it is per case."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _send(fd: int, obj: Any) -> None:
    import pickle

    data = pickle.dumps(obj)
    view = memoryview(struct.pack("<I", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _recv(fd: int) -> Any:
    """One message, or ``None`` at the end of the stream."""
    import pickle

    def exactly(n: int) -> bytes | None:
        parts, left = [], n
        while left:
            chunk = os.read(fd, left)
            if not chunk:
                return None
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    head = exactly(4)
    body = exactly(struct.unpack("<I", head)[0]) if head is not None else None
    return None if body is None else pickle.loads(body)  # noqa: S301 - our own child's messages


def _serve() -> None:
    """The worker's loop: read a case, run it under the memory cap, answer its outcome."""
    import weightsmith  # noqa: F401 - imported before the cap: the case measures only itself
    import weightsmith.trust  # noqa: F401

    out = os.dup(1)
    os.dup2(2, 1)  # stray prints go to stderr, not into the answers
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with tempfile.TemporaryDirectory() as d:
        for kind, data in bases().items():  # whole files first: every lazy import happens before the cap
            run_case(Case(_SUFFIX[kind], data, "warm-up"), Path(d))
        for files in folder_bases().values():
            run_case(Case(FOLDER, _zip_folder(files), "warm-up"), Path(d))
        _send(out, "ready")
        while (message := _recv(0)) is not None:
            case = Case(*message)
            _reset_peak()
            before = _status("VmRSS")
            space = _status("VmSize")
            if space:
                cap = space + memory_limit(len(case.data))
                resource.setrlimit(resource.RLIMIT_AS, (cap if hard < 0 else min(cap, hard), hard))
            start = time.perf_counter()
            try:
                outcome = run_case(case, Path(d), timeout_s=int(time_limit(len(case.data))))
            finally:
                resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
            seconds = time.perf_counter() - start
            peak = max(0, _status("VmHWM") - before) / 2**20
            _send(out, (outcome.kind, outcome.detail, seconds, peak))


class Worker:
    """A child process that runs cases one after another, each under a memory and a time limit.

    The child caps its address space at `memory_limit` above its size before each case (an
    allocation beyond fails as an uncaught ``MemoryError``); the parent kills it when a case
    runs past `time_limit` plus a margin (a hang) and starts a new one, as it does when the
    child dies (a crash, such as SIGBUS). One child serves many cases: starting one costs the
    import of torch.
    """

    def __init__(self) -> None:
        self._proc: Any = None
        self._log = tempfile.TemporaryFile()
        self.started = 0

    def _start(self) -> None:
        import subprocess

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, env=env)
        self.started += 1
        if _recv(self._proc.stdout.fileno()) != "ready":
            raise RuntimeError(f"the fuzz worker did not start (exit {self._proc.wait()}): {self._stderr()}")

    def _stderr(self) -> str:
        self._log.seek(0)
        text = self._log.read()[-400:].decode(errors="replace").strip()
        self._log.seek(0)
        self._log.truncate()
        return text

    def _stop(self) -> int:
        proc, self._proc = self._proc, None
        if proc.poll() is None:
            proc.kill()
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        return proc.wait()

    def run(self, case: Case) -> Outcome:
        """Run one case in the child; a hang or a crash restarts it."""
        import select

        if self._proc is None:
            self._start()
        limit = time_limit(len(case.data)) + 5  # the child's own alarm goes off first
        try:
            _send(self._proc.stdin.fileno(), (case.suffix, case.data, case.how, case.cut))  # plain data both ways
        except BrokenPipeError:
            pass  # died: reported below
        ready, _, _ = select.select([self._proc.stdout], [], [], limit)
        if not ready:
            self._stop()
            return Outcome("hang", f"killed after {limit:.0f} s [{case.how}]", limit)
        answer = _recv(self._proc.stdout.fileno())
        if answer is None:
            code = self._stop()
            how = f"signal {-code} ({signal.Signals(-code).name})" if code < 0 else f"exit {code}"
            return Outcome("crash", f"{how}: {self._stderr()[-200:]} [{case.how}]")
        return Outcome(*answer)

    def close(self) -> None:
        if self._proc is not None:
            self._stop()  # nothing to flush: killing spares the interpreter's slow shutdown
        self._log.close()


# -- the command line --------------------------------------------------------------------------------
def _keep(found: Path, kind: str, n: int, case: Case, outcome: Outcome) -> None:
    """Keep a failing input under ``found/`` with a note of what it did."""
    found.mkdir(parents=True, exist_ok=True)
    stem = found / f"{kind}-{n:03d}"
    stem.with_suffix(case.suffix).write_bytes(case.data)
    stem.with_suffix(".txt").write_text(f"{case.how}\ncut: {case.cut}\n{outcome.detail}\n")


def main(argv: list[str] | None = None) -> int:
    from hypothesis import HealthCheck, Phase, given, seed, settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="number of damaged files to try")
    parser.add_argument("--seed", type=int, default=0, help="seed of the case generator")
    parser.add_argument("--found", type=Path, default=Path(__file__).parent / "found",
                        help="where inputs that fail are kept (at most 20 per kind)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _serve()
        return 0

    bases()
    counts: Counter[str] = Counter()
    examples: dict[str, str] = {}
    worst = Outcome("ok")
    peak = Outcome("ok")
    start = time.perf_counter()
    worker = Worker()

    @seed(args.seed)
    @settings(max_examples=args.cases, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=cases())
    def fuzz(case: Case) -> None:
        nonlocal worst, peak
        outcome = worker.run(case)
        counts[outcome.kind] += 1
        if outcome.kind not in FAILURES:
            if outcome.seconds > worst.seconds:
                worst = Outcome(outcome.kind, f"{case.how} ({len(case.data):,} bytes)", outcome.seconds)
            if outcome.peak_mib > peak.peak_mib:
                peak = Outcome(outcome.kind, f"{case.how} ({len(case.data):,} bytes)", peak_mib=outcome.peak_mib)
        else:
            examples.setdefault(outcome.detail.split(":")[0], outcome.detail)
            if counts[outcome.kind] <= 20:
                _keep(args.found, outcome.kind, counts[outcome.kind], case, outcome)

    try:
        fuzz()
    finally:
        worker.close()

    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"cases:                 {sum(counts.values()):,}")
    print(f"opened fine:           {counts['ok']:,}")
    print(f"WeightsmithError:      {counts['error']:,}")
    for kind in FAILURES:
        print(f"{kind + ':':<22} {counts[kind]:,}")
    print(f"worst time per case:   {worst.seconds:.3f} s ({worst.detail})")
    print(f"peak memory per case:  {peak.peak_mib:.1f} MiB above the worker's resident size ({peak.detail})")
    print(f"worker peak RSS:       {children:.0f} MiB (ru_maxrss, {worker.started} worker(s) started)")
    print(f"limits per case:       {time_limit(0):.0f} s + 1 s/MiB; address space +256 MiB + 2x the file")
    print(f"time:                  {time.perf_counter() - start:.0f} s (seed {args.seed})")
    for detail in examples.values():
        print(f"  e.g. {detail}")
    return 1 if any(counts[k] for k in FAILURES) else 0


if __name__ == "__main__":
    sys.exit(main())
