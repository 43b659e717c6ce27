"""Hostile pickles: every file here would run code in a real unpickler, and weightsmith runs none.

Each payload does one harmless, visible thing when unpickled for real: it creates a marker
file. For every fixture, `weightsmith.open` refuses the file, `scan_globals` names the offending
global as refused, and the marker never appears. A control test unpickles the payloads with
plain `pickle.loads` in a subprocess and sees every marker appear, so the refusals are meaningful.

The pickles are assembled opcode by opcode (`_Asm`): ``pickle.dumps`` would never write ``INST``
for a modern class, nor take global names from the memo.
"""

from __future__ import annotations

import io
import json
import marshal
import pickle
import struct
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import weightsmith
from weightsmith.errors import (
    CheckpointError,
    CorruptCheckpointError,
    UnknownFormatError,
    UnsafeCheckpointError,
)
from weightsmith.io import _pickle
from weightsmith.trust import scan_globals

MARKER_NAME = "PWNED"


# -- a small pickle assembler ---------------------------------------------------------------------
@dataclass(frozen=True)
class G:
    """A global, by module and (possibly dotted) name."""

    module: str
    name: str


@dataclass(frozen=True)
class Call:
    """``fn(*args)``: ``fn`` a `G` or another `Call`."""

    fn: Any
    args: tuple[Any, ...]


class _Asm:
    """Writes an expression of `G`, `Call` and plain values as pickle opcodes.

    Args:
        proto: the protocol (0-5): opcodes for strings, ints, memo and the PROTO header.
        globals_by: ``"GLOBAL"`` (the ``c`` opcode) or ``"STACK_GLOBAL"`` with the module and
            name strings stored in the memo up front and fetched from it (protocol 4+).
        top: how the outermost call is made: ``"REDUCE"``, ``"INST"`` or ``"OBJ"``.
    """

    def __init__(self, proto: int, *, globals_by: str = "GLOBAL", top: str = "REDUCE") -> None:
        self.proto, self.globals_by, self.top = proto, globals_by, top
        self.memo: dict[str, int] = {}
        self.preamble = b""

    def dumps(self, expr: Any) -> bytes:
        body = self.value(expr, top=True)
        head = bytes([0x80, self.proto]) if self.proto >= 2 else b""
        return head + self.preamble + body + b"."

    # memo ---------------------------------------------------------------------------------
    def _put(self, i: int) -> bytes:
        return b"q" + bytes([i]) if self.proto >= 1 else b"p%d\n" % i

    def _get(self, i: int) -> bytes:
        return b"h" + bytes([i]) if self.proto >= 1 else b"g%d\n" % i

    def _memo_string(self, text: str) -> bytes:
        if text not in self.memo:
            self.memo[text] = i = len(self.memo)
            self.preamble += self.string(text) + self._put(i) + b"0"  # push, memoize, pop
        return self._get(self.memo[text])

    # values -------------------------------------------------------------------------------
    def string(self, text: str) -> bytes:
        if self.proto == 0:
            escaped = text.replace("\\", "\\u005c").replace("\n", "\\u000a")
            return b"V" + escaped.encode("raw-unicode-escape") + b"\n"
        data = text.encode()
        return b"X" + struct.pack("<I", len(data)) + data

    def global_(self, g: G) -> bytes:
        if self.globals_by == "STACK_GLOBAL":
            return self._memo_string(g.module) + self._memo_string(g.name) + b"\x93"
        return b"c" + g.module.encode() + b"\n" + g.name.encode() + b"\n"

    def value(self, v: Any, *, top: bool = False) -> bytes:
        if isinstance(v, G):
            return self.global_(v)
        if isinstance(v, Call):
            args = b"".join(self.value(a) for a in v.args)
            how = self.top if top else "REDUCE"
            if how == "INST":
                assert isinstance(v.fn, G), "INST names its global inline"
                return b"(" + args + b"i" + v.fn.module.encode() + b"\n" + v.fn.name.encode() + b"\n"
            if how == "OBJ":
                return b"(" + self.value(v.fn) + args + b"o"
            return self.value(v.fn) + b"(" + args + b"tR"
        if v is None:
            return b"N"
        if isinstance(v, bool):
            return b"I01\n" if v else b"I00\n"
        if isinstance(v, int):
            return b"I%d\n" % v if self.proto == 0 else b"J" + struct.pack("<i", v)
        if isinstance(v, str):
            return self.string(v)
        if isinstance(v, bytes):
            if self.proto >= 3:
                return b"B" + struct.pack("<I", len(v)) + v
            return self.value(Call(G("_codecs", "encode"), (v.decode("latin1"), "latin1")))
        if isinstance(v, tuple):
            return b"(" + b"".join(self.value(x) for x in v) + b"t"
        if isinstance(v, list):
            return b"(" + b"".join(self.value(x) for x in v) + b"l"
        if isinstance(v, dict):
            return b"(" + b"".join(self.value(k) + self.value(x) for k, x in v.items()) + b"d"
        raise TypeError(f"cannot assemble {v!r}")


# -- payloads -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Payload:
    """An expression that creates ``marker`` when unpickled for real, and the global it must be refused by."""

    name: str
    build: Callable[[str, str], Any]  # (marker, script) -> expression
    refused: str                      # a global scan_globals must report as refused
    runnable: bool = True             # False: referenced only, never run, not even in the control


def _import_os() -> Call:
    return Call(G("builtins", "__import__"), ("os",))


def _code_bytes(marker: str) -> bytes:
    return marshal.dumps(compile(f"open({marker!r}, 'w').close()", "<payload>", "exec"))


PAYLOADS = [
    Payload("open", lambda m, s: Call(G("builtins", "open"), (m, "w")), "builtins.open"),
    Payload("io.open", lambda m, s: Call(G("io", "open"), (m, "w")), "io.open"),
    Payload("os.system", lambda m, s: Call(G("os", "system"), (f"touch {m}",)), "os.system"),
    Payload("posix.system", lambda m, s: Call(G("posix", "system"), (f"touch {m}",)), "posix.system"),
    Payload("eval", lambda m, s: Call(G("builtins", "eval"), (f"open({m!r}, 'w').close()",)), "builtins.eval"),
    Payload("exec", lambda m, s: Call(G("builtins", "exec"), (f"open({m!r}, 'w').close()",)), "builtins.exec"),
    Payload("runpy.run_path", lambda m, s: Call(G("runpy", "run_path"), (s,)), "runpy.run_path"),
    Payload("pydoc.locate", lambda m, s: Call(Call(G("pydoc", "locate"), ("os.system",)), (f"touch {m}",)),
            "pydoc.locate"),
    Payload("operator.methodcaller",
            lambda m, s: Call(Call(G("operator", "methodcaller"), ("system", f"touch {m}")), (_import_os(),)),
            "operator.methodcaller"),
    Payload("getattr", lambda m, s: Call(Call(G("builtins", "getattr"), (_import_os(), "system")),
                                         (f"touch {m}",)), "builtins.getattr"),
    Payload("subprocess.call", lambda m, s: Call(G("subprocess", "call"), (["touch", m],)), "subprocess.call"),
    Payload("subprocess.Popen", lambda m, s: Call(G("subprocess", "Popen"), (["touch", m],)),
            "subprocess.Popen"),
    Payload("marshal+FunctionType",
            lambda m, s: Call(Call(G("types", "FunctionType"), (Call(G("marshal", "loads"), (_code_bytes(m),)),
                                                                {})), ()),
            "marshal.loads"),
    Payload("timeit", lambda m, s: Call(G("timeit", "timeit"), ("pass", f"open({m!r}, 'w').close()")),
            "timeit.timeit"),
    Payload("cProfile.run", lambda m, s: Call(G("cProfile", "run"), (f"open({m!r}, 'w').close()",)),
            "cProfile.run"),
    Payload("shutil.copyfile", lambda m, s: Call(G("shutil", "copyfile"), (s, m)), "shutil.copyfile"),
    # an allowlisted global (pathlib.PosixPath) as the argument of a dotted one: Path.touch
    Payload("Path.touch", lambda m, s: Call(G("pathlib", "Path.touch"), (Call(G("pathlib", "PosixPath"), (m,)),)),
            "pathlib.Path.touch"),
    Payload("ctypes", lambda m, s: Call(G("ctypes", "CDLL"), (None,)), "ctypes.CDLL", runnable=False),
    Payload("pip.main", lambda m, s: Call(G("pip", "main"), (["--version"],)), "pip.main", runnable=False),
]
_BY_NAME = {p.name: p for p in PAYLOADS}


def _encodings(payload: Payload) -> list[tuple[int, str, str]]:
    """(protocol, globals_by, top) combinations this payload can be written in."""
    dotted = "." in payload.build("m", "s").fn.name if isinstance(payload.build("m", "s").fn, G) else False
    out = []
    for proto in range(6):
        if dotted and proto < 4:
            continue  # a dotted name resolves only under protocol 4+
        for globals_by in ("GLOBAL", "STACK_GLOBAL"):
            if globals_by == "STACK_GLOBAL" and proto < 4:
                continue
            for top in ("REDUCE", "INST", "OBJ"):
                if top == "INST" and (globals_by == "STACK_GLOBAL" or not isinstance(payload.build("m", "s").fn, G)):
                    continue
                out.append((proto, globals_by, top))
    return out


def payload_bytes(name: str, marker: str, script: str, proto: int, globals_by: str, top: str) -> bytes:
    return _Asm(proto, globals_by=globals_by, top=top).dumps(_BY_NAME[name].build(marker, script))


# -- containers -----------------------------------------------------------------------------------
def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _torch_members() -> dict[str, bytes]:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(6.0)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def _torchscript_members() -> dict[str, bytes]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated; its archives are not
        scripted = torch.jit.script(torch.nn.Linear(2, 2))
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def _prefix(members: dict[str, bytes]) -> str:
    return next(n for n in members if n.endswith("/data.pkl"))[: -len("data.pkl")]


def _legacy(objects: bytes, *, keys: bytes | None = None, sys_info: bytes | None = None) -> bytes:
    from weightsmith.io.torchfile import LEGACY_MAGIC

    return (pickle.dumps(LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
            + (sys_info or pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2))
            + objects + (keys or pickle.dumps([], protocol=2)))


@dataclass(frozen=True)
class Fixture:
    """One hostile file: how to build it, what must refuse it, and the global to name."""

    id: str
    payload: str
    encoding: tuple[int, str, str]
    container: str
    error: type[Exception] = UnsafeCheckpointError


def _raw_error(encoding: tuple[int, str, str]) -> type[Exception]:
    # a bare pickle of protocol 2+ starts like a legacy torch file and is read as one; protocols
    # 0 and 1 start like nothing weightsmith reads
    return UnsafeCheckpointError if encoding[0] >= 2 else UnknownFormatError


def _fixtures() -> list[Fixture]:
    fx: list[Fixture] = []
    # every payload, raw, in an encoding rotated over the protocols and opcodes
    for i, p in enumerate(PAYLOADS):
        encs = _encodings(p)
        enc = encs[(i * 7) % len(encs)]
        fx.append(Fixture(f"raw-{p.name}-p{enc[0]}-{enc[1]}-{enc[2]}", p.name, enc, "raw", _raw_error(enc)))
    # one payload in every encoding there is
    for enc in _encodings(_BY_NAME["os.system"]):
        fx.append(Fixture(f"enc-os.system-p{enc[0]}-{enc[1]}-{enc[2]}", "os.system", enc, "raw", _raw_error(enc)))
    # containers
    fx += [
        Fixture("zip-data.pkl-open", "open", (2, "GLOBAL", "REDUCE"), "zip-data"),
        Fixture("zip-data.pkl-pydoc", "pydoc.locate", (2, "GLOBAL", "REDUCE"), "zip-data"),
        Fixture("zip-data.pkl-marshal", "marshal+FunctionType", (4, "STACK_GLOBAL", "REDUCE"), "zip-data"),
        Fixture("zip-data.pkl-truncated-after-call", "os.system", (2, "GLOBAL", "REDUCE"), "zip-data-truncated"),
        Fixture("zip-hidden-member", "exec", (3, "GLOBAL", "OBJ"), "zip-hidden"),
        Fixture("zip-no-data.pkl", "eval", (2, "GLOBAL", "REDUCE"), "zip-only-hidden", CheckpointError),
        Fixture("legacy-objects", "subprocess.call", (2, "GLOBAL", "INST"), "legacy-objects"),
        Fixture("legacy-storage-keys", "os.system", (2, "GLOBAL", "REDUCE"), "legacy-keys"),
        Fixture("legacy-sys-info", "getattr", (2, "GLOBAL", "REDUCE"), "legacy-sysinfo"),
        Fixture("several-pickles", "runpy.run_path", (4, "STACK_GLOBAL", "REDUCE"), "several", CheckpointError),
        Fixture("torchscript-constants.pkl", "os.system", (2, "GLOBAL", "REDUCE"), "torchscript-constants"),
        Fixture("torchscript-code", "os.system", (2, "GLOBAL", "REDUCE"), "torchscript-code"),
        Fixture("dcp-metadata", "operator.methodcaller", (4, "STACK_GLOBAL", "REDUCE"), "dcp"),
        Fixture("sharded-bin-shard", "open", (2, "GLOBAL", "REDUCE"), "sharded"),
    ]
    return fx


FIXTURES = _fixtures()


class _Builder:
    """Writes fixture files into one folder; every payload targets the same marker."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.marker = folder / MARKER_NAME
        self.script = folder / "payload_script.py"
        self.script.write_text(f"open({str(self.marker)!r}, 'w').close()\n")
        self._torch: dict[str, bytes] | None = None
        self._jit: dict[str, bytes] | None = None

    def torch_members(self) -> dict[str, bytes]:
        if self._torch is None:
            self._torch = _torch_members()
        return dict(self._torch)

    def jit_members(self) -> dict[str, bytes]:
        if self._jit is None:
            self._jit = _torchscript_members()
        return dict(self._jit)

    def build(self, f: Fixture) -> Path:
        hostile = payload_bytes(f.payload, str(self.marker), str(self.script), *f.encoding)
        path = self.folder / f.id
        c = f.container
        if c == "raw":
            path = path.with_suffix(".pkl")
            path.write_bytes(hostile)
        elif c in ("zip-data", "zip-data-truncated"):
            members = self.torch_members()
            members[f"{_prefix(members)}data.pkl"] = hostile if c == "zip-data" else hostile[:-1] + b"\xff garbage"
            path = path.with_suffix(".pt")
            path.write_bytes(_zip(members))
        elif c == "zip-hidden":
            members = self.torch_members()
            members[f"{_prefix(members)}extra.pkl"] = hostile
            path = path.with_suffix(".pt")
            path.write_bytes(_zip(members))
        elif c == "zip-only-hidden":
            path = path.with_suffix(".pt")
            path.write_bytes(_zip({"archive/model.pkl": hostile, "archive/version": b"3\n"}))
        elif c.startswith("legacy"):
            benign = pickle.dumps({"w": 1}, protocol=2)
            path = path.with_suffix(".pt")
            path.write_bytes(_legacy(hostile if c == "legacy-objects" else benign,
                                     keys=hostile if c == "legacy-keys" else None,
                                     sys_info=hostile if c == "legacy-sysinfo" else None))
        elif c == "several":
            path = path.with_suffix(".pkl")
            path.write_bytes(pickle.dumps({"lr": 0.1}, protocol=4) + hostile)
        elif c == "torchscript-constants":
            members = self.jit_members()
            members[f"{_prefix(members)}constants.pkl"] = hostile
            path = path.with_suffix(".pt")
            path.write_bytes(_zip(members))
        elif c == "torchscript-code":
            members = self.torch_members()
            code = f"import os\nos.system('touch {self.marker}')\n"
            members[f"{_prefix(members)}code/__torch__/evil.py"] = code.encode()
            path = path.with_suffix(".pt")
            path.write_bytes(_zip(members))
        elif c == "dcp":
            path.mkdir()
            (path / ".metadata").write_bytes(hostile)
            (path / "__0_0.distcp").write_bytes(b"\0" * 16)
        elif c == "sharded":
            path.mkdir()
            members = self.torch_members()
            members[f"{_prefix(members)}data.pkl"] = hostile
            (path / "pytorch_model-00001-of-00001.bin").write_bytes(_zip(members))
            (path / "pytorch_model.bin.index.json").write_text(
                json.dumps({"weight_map": {"w": "pytorch_model-00001-of-00001.bin"}}))
        else:  # pragma: no cover - a typo in the table
            raise AssertionError(c)
        return path


def _refused_for(f: Fixture) -> str:
    if f.container == "torchscript-code":
        return "torch.jit"
    return _BY_NAME[f.payload].refused


@pytest.fixture(scope="module")
def builder(tmp_path_factory: pytest.TempPathFactory) -> _Builder:
    return _Builder(tmp_path_factory.mktemp("hostile"))


# -- the tests ------------------------------------------------------------------------------------
def test_there_are_at_least_30_hostile_fixtures() -> None:
    assert len(FIXTURES) >= 30
    assert len({f.id for f in FIXTURES}) == len(FIXTURES)
    # every protocol, every way of naming a global and every calling opcode is covered
    encodings = {f.encoding for f in FIXTURES}
    assert {e[0] for e in encodings} == set(range(6))
    assert {e[1] for e in encodings} == {"GLOBAL", "STACK_GLOBAL"}
    assert {e[2] for e in encodings} == {"REDUCE", "INST", "OBJ"}


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda f: f.id)
def test_hostile_file_is_refused_and_runs_nothing(builder: _Builder, fixture: Fixture) -> None:
    path = builder.build(fixture)
    assert not builder.marker.exists()

    with pytest.raises(fixture.error) as err:
        weightsmith.open(path)
    assert str(path.name) in str(err.value) or str(path) in str(err.value)
    if isinstance(err.value, UnsafeCheckpointError) and not fixture.container.startswith("torchscript"):
        assert _refused_for(fixture) in err.value.globals

    report = scan_globals(path)
    assert not report.safe
    assert _refused_for(fixture) in report.refused, report.to_dict()
    assert not builder.marker.exists(), f"{fixture.id} ran its payload"


def test_scan_globals_reports_how_each_global_was_used(builder: _Builder) -> None:
    fixture = next(f for f in FIXTURES if f.container == "zip-data" and f.payload == "pydoc.locate")
    report = scan_globals(builder.build(fixture))
    by_name = {g.name: g for g in report.globals}
    assert by_name["pydoc.locate"].status == "refused"
    assert "called" in by_name["pydoc.locate"].uses
    assert by_name["pydoc.locate"].where == ("archive/data.pkl",) or by_name["pydoc.locate"].where[0].endswith(
        "/data.pkl")
    # the walk goes on past each call, naming the opcode and byte where it would happen
    calls = by_name["pydoc.locate"].calls
    assert calls and "REDUCE at byte" in calls[0]
    assert "pydoc.locate(...)" in report.refused  # the located function, called in turn
    assert report.to_dict()["schema"] == "weightsmith.globals/1"
    assert report.to_dict()["safe"] is False


def test_torchscript_constants_are_scanned_next_to_data_pkl(builder: _Builder) -> None:
    fixture = next(f for f in FIXTURES if f.container == "torchscript-constants")
    report = scan_globals(builder.build(fixture))
    assert report.format == "torchscript"
    assert any(p.endswith("constants.pkl") for p in report.pickles)
    assert any(p.endswith("data.pkl") for p in report.pickles)
    assert {"os.system", "torch.jit"} <= set(report.refused)


def test_a_pickle_hidden_under_a_plain_name_is_found_by_its_opcodes(builder: _Builder) -> None:
    members = builder.torch_members()
    hostile = payload_bytes("os.system", str(builder.marker), str(builder.script), 2, "GLOBAL", "REDUCE")
    members[f"{_prefix(members)}.data/extra"] = hostile  # not named .pkl, not a storage
    path = builder.folder / "hidden-plain-name.pt"
    path.write_bytes(_zip(members))

    report = scan_globals(path)
    assert "os.system" in report.refused
    assert any(p.endswith(".data/extra") for p in report.pickles)
    # torch.load never reads that member: the checkpoint itself opens, and nothing ran
    assert torch.equal(weightsmith.open(path).load()["w"], torch.arange(6.0))
    assert not builder.marker.exists()


def test_a_plain_checkpoint_scans_as_safe(tmp_path: Path) -> None:
    import argparse

    path = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    report = scan_globals(path)
    assert report.safe, report.to_dict()
    status = {g.name: g.status for g in report.globals}
    assert status["argparse.Namespace"] == "data"
    assert status["torch._utils._rebuild_tensor_v2"] == "allowed"


def test_build_onto_an_allowlisted_function_cannot_change_later_reads(tmp_path: Path) -> None:
    # GLOBAL _rebuild_parameter; BUILD (None, {"__defaults__": (False,)}): setattr on the function
    poison = (b"\x80\x02ctorch._utils\n_rebuild_parameter\nN}X\x0c\x00\x00\x00__defaults__"
              b"\x89\x85s\x86b.")
    members = _torch_members()
    members[f"{_prefix(members)}data.pkl"] = poison
    path = tmp_path / "poison.pt"
    path.write_bytes(_zip(members))
    before = _pickle._TORCH_FUNCS["torch._utils._rebuild_parameter"].__defaults__

    with pytest.raises(CorruptCheckpointError, match="sets state on the function"):
        weightsmith.open(path)
    assert _pickle._TORCH_FUNCS["torch._utils._rebuild_parameter"].__defaults__ == before


def test_build_onto_a_placeholder_class_cannot_silence_its_call(tmp_path: Path) -> None:
    # GLOBAL os.system; BUILD (None, {"__new__": OrderedDict}) on the placeholder class, then call it
    body = (b"\x80\x02cos\nsystem\nq\x00N}X\x07\x00\x00\x00__new__ccollections\nOrderedDict\ns\x86b"
            b"0h\x00X\x04\x00\x00\x00true\x85R.")
    path = tmp_path / "silenced.pkl"
    path.write_bytes(body)
    with pytest.raises(CheckpointError):
        weightsmith.open(path)
    # BUILD on the class itself changes a global: a call; the call after it is seen as well
    report = scan_globals(path)
    assert "os.system" in report.refused
    calls = next(g for g in report.globals if g.name == "os.system").calls
    assert any("BUILD" in c for c in calls) and any("REDUCE" in c for c in calls), calls


# -- the control: the payloads really run under a real unpickler ------------------------------------
_CONTROL = r"""
import json, pickle, sys, torch
cases = json.loads(sys.argv[1])
for blob_hex in cases["pickles"]:
    try:
        pickle.loads(bytes.fromhex(blob_hex))
    except Exception:
        pass  # chained gadgets may fail after their call ran
torch.load(cases["zip"], weights_only=False)
"""


def test_control_real_unpickling_runs_every_payload(tmp_path: Path) -> None:
    pickles, markers = [], []
    for p in PAYLOADS:
        if not p.runnable:
            continue
        for proto, globals_by, top in (_encodings(p)[0], _encodings(p)[-1]):
            marker = tmp_path / f"marker-{p.name}-{proto}-{globals_by}-{top}"
            script = tmp_path / f"script-{len(markers)}.py"
            script.write_text(f"open({str(marker)!r}, 'w').close()\n")
            pickles.append(payload_bytes(p.name, str(marker), str(script), proto, globals_by, top).hex())
            markers.append(marker)
    zip_marker = tmp_path / "marker-torch-load"
    members = _torch_members()
    members[f"{_prefix(members)}data.pkl"] = payload_bytes("open", str(zip_marker), "", 2, "GLOBAL", "REDUCE")
    zip_path = tmp_path / "hostile.pt"
    zip_path.write_bytes(_zip(members))

    subprocess.run([sys.executable, "-c", _CONTROL, json.dumps({"pickles": pickles, "zip": str(zip_path)})],
                   check=False, capture_output=True, timeout=120, cwd=tmp_path)

    missing = [m.name for m in [*markers, zip_marker] if not m.exists()]
    assert not missing, f"payloads that did not run under a real unpickler: {missing}"
