"""Pickles that run code without a REDUCE of the payload: every call a real unpickler makes is seen.

Each payload runs ``touch MARKER`` under a real unpickler through a call the opcodes never spell
as "call this": ``copyreg._reconstructor`` calling ``list.__init__`` (or ``OrderedDict.__init__``)
on a lazy ``map``/``itertools.starmap``, ``NEWOBJ_EX``, Python 2 names, a tensor's
``backward_hooks`` argument, ``APPEND`` on an object whose ``append`` is ``os.system``, and the
same inside a DCP ``.metadata``. A control runs each with plain ``pickle.loads`` /
``torch.load(weights_only=False)`` in a subprocess and sees every marker appear; the tests
then check that ``weightsmith check`` reports each unsafe, naming the global and the opcode
position, that `weightsmith.open` refuses it, and that no marker is ever created.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import weightsmith
from weightsmith.cli import cli
from weightsmith.errors import CheckpointError
from weightsmith.trust import scan_globals


# -- opcodes ----------------------------------------------------------------------------------------
def g(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def s(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def lst(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"l"


def reduce(fn: bytes, args: bytes) -> bytes:
    return fn + args + b"R"


def newobj(cls: bytes, args: bytes) -> bytes:
    return cls + args + b"\x81"


def newobj_ex(cls: bytes, args: bytes) -> bytes:
    return cls + args + b"}" + b"\x92"


def system(cmd: str, *, py2: bool = False) -> bytes:
    """``map(posix.system, [cmd])``: lazy, runs when something iterates it."""
    return newobj(g("__builtin__" if py2 else "builtins", "map"), tup(g("posix", "system"), lst(s(cmd))))


def drain(state: bytes, *, base: tuple[str, str] = ("builtins", "list"), py2: bool = False) -> bytes:
    """``copyreg._reconstructor(base, base, state)``: ``base.__init__(obj, state)`` iterates state."""
    mod = "copy_reg" if py2 else "copyreg"
    b = g("__builtin__", base[1]) if py2 else g(*base)
    return reduce(g(mod, "_reconstructor"), tup(b, b, state))


def pickle_of(body: bytes, proto: int = 2) -> bytes:
    return bytes([0x80, proto]) + body + b"."


# -- payloads (marker -> pickle bytes) and the global each must be refused by -------------------------
def _starmap(cmd: str) -> bytes:
    return drain(newobj(g("itertools", "starmap"), tup(g("posix", "system"), lst(tup(s(cmd))))))


def _append_gadget(cmd: str) -> bytes:
    # a SimpleNamespace whose attribute ``append`` is os.system, then APPEND: load_append calls it
    obj = newobj(g("types", "SimpleNamespace"), b")")
    return obj + b"}" + s("append") + g("posix", "system") + b"sb" + s(cmd) + b"a"


PAYLOADS: dict[str, tuple[Callable[[str], bytes], str]] = {
    "reconstructor-list-map": (lambda c: pickle_of(drain(system(c))), "builtins.map"),
    "py2-names": (lambda c: pickle_of(drain(system(c, py2=True), py2=True)), "builtins.map"),
    "ordereddict-base": (lambda c: pickle_of(drain(system(c), base=("collections", "OrderedDict"))),
                         "collections.OrderedDict"),
    "dict-base": (lambda c: pickle_of(drain(system(c), base=("builtins", "dict"))), "builtins.dict"),
    "starmap": (lambda c: pickle_of(_starmap(c)), "itertools.starmap"),
    "newobj-ex": (lambda c: pickle_of(drain(newobj_ex(g("builtins", "map"),
                                                       tup(g("posix", "system"), lst(s(c))))), proto=4),
                  "builtins.map"),
    "append-on-object": (lambda c: pickle_of(_append_gadget(c)), "types.SimpleNamespace"),
    "dict-of-drain": (lambda c: pickle_of(b"}" + s("x") + drain(system(c)) + b"s"), "builtins.map"),
}


def _torch_members() -> dict[str, bytes]:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(6.0)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def _hooks_pickle(cmd: str) -> bytes:
    """``{"w": _rebuild_tensor_v2(storage, 0, (6,), (1,), False, OrderedDict(map(system, [cmd])))}``."""
    storage = tup(s("storage"), g("torch", "FloatStorage"), s("0"), s("cpu"), b"K\x06") + b"Q"
    hooks = reduce(g("collections", "OrderedDict"), tup(system(cmd)))
    tensor = reduce(g("torch._utils", "_rebuild_tensor_v2"),
                    tup(storage, b"K\x00", tup(b"K\x06"), tup(b"K\x01"), b"\x89", hooks))
    return pickle_of(b"}" + s("w") + tensor + b"s")


def _write(kind: str, folder: Path, name: str, marker: Path) -> Path:
    """A hostile file of one kind: raw pickle, torch zip (hooks payload) or DCP folder."""
    cmd = f"touch {marker}"
    if kind == "zip":
        members = _torch_members()
        prefix = next(n for n in members if n.endswith("/data.pkl"))[: -len("data.pkl")]
        members[f"{prefix}data.pkl"] = _hooks_pickle(cmd)
        path = folder / f"{name}.pt"
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for member, data in members.items():
                zf.writestr(member, data)
        path.write_bytes(buf.getvalue())
        return path
    body = PAYLOADS[name][0](cmd)
    if kind == "dcp":
        path = folder / f"{name}-dcp"
        path.mkdir()
        (path / ".metadata").write_bytes(body)
        (path / "__0_0.distcp").write_bytes(b"\0" * 16)
        return path
    path = folder / f"{name}.pkl"
    path.write_bytes(body)
    return path


CASES = [("raw", name, PAYLOADS[name][1]) for name in PAYLOADS]
CASES += [("zip", "backward-hooks", "builtins.map"), ("dcp", "reconstructor-list-map", "builtins.map"),
          ("dcp", "starmap", "itertools.starmap")]

_CONTROL = r"""
import pickle, sys, torch
for kind, path in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        if kind == "zip":
            torch.load(path, weights_only=False)
        else:
            pickle.loads(open(path + "/.metadata" if kind == "dcp" else path, "rb").read())
    except Exception:
        pass  # the gadgets fail after their call ran (map yields an int where a pair is due)
"""


def test_control_every_payload_runs_under_a_real_unpickler(tmp_path: Path) -> None:
    args, markers = [], []
    for i, (kind, name, _) in enumerate(CASES):
        marker = tmp_path / f"marker-{i}"
        path = _write(kind, tmp_path, name if kind != "zip" else "backward-hooks", marker)
        args += [kind, str(path)]
        markers.append(marker)
    subprocess.run([sys.executable, "-c", _CONTROL, *args], check=False, capture_output=True, timeout=120,
                   cwd=tmp_path)
    missing = [CASES[i][:2] for i, m in enumerate(markers) if not m.exists()]
    assert not missing, f"payloads that did not run under a real unpickler: {missing}"


@pytest.mark.parametrize(("kind", "name", "refused"), CASES, ids=[f"{k}-{n}" for k, n, _ in CASES])
def test_check_reports_the_call_and_nothing_runs(tmp_path: Path, kind: str, name: str, refused: str) -> None:
    marker = tmp_path / "MARKER"
    path = _write(kind, tmp_path, name, marker)

    result = CliRunner().invoke(cli, ["check", str(path), "--json"])
    assert result.exit_code == 1, result.output
    data = json.loads(result.output)
    assert data["ok"] is False and data["globals"]["safe"] is False
    by_name = {entry["name"]: entry for entry in data["globals"]["globals"]}
    assert by_name[refused]["status"] == "refused", by_name[refused]
    assert "called" in by_name[refused]["uses"]
    assert any(" at byte " in c for c in by_name[refused]["calls"]), by_name[refused]

    report = scan_globals(path)
    assert not report.safe and refused in report.refused
    with pytest.raises(CheckpointError):
        weightsmith.open(path)
    assert not marker.exists(), f"{kind}-{name} ran its payload"


def test_the_payload_global_itself_is_named(tmp_path: Path) -> None:
    # map hands each item to posix.system: the function it would call is refused by name too
    path = _write("raw", tmp_path, "reconstructor-list-map", tmp_path / "MARKER")
    report = scan_globals(path)
    assert {"builtins.map", "posix.system", "builtins.list"} <= set(report.refused), report.refused


def test_the_open_error_says_which_opcode_would_call(tmp_path: Path) -> None:
    path = _write("raw", tmp_path, "starmap", tmp_path / "MARKER")
    with pytest.raises(CheckpointError, match=r"itertools\.starmap.*NEWOBJ at byte \d+"):
        weightsmith.open(path)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (exec, (f"open({self.marker!r}, 'w').write('x')",))


_DCP_CONTROL = r"""
import sys, warnings, torch, torch.distributed.checkpoint as dcp
warnings.simplefilter("ignore")
state = {"w": torch.zeros(3), "extra": None}
dcp.load(state, checkpoint_id=sys.argv[1], no_dist=True)
"""


def test_a_dcp_non_tensor_entry_is_scanned_as_dcp_load_unpickles_it(tmp_path: Path) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "ckpt"
    marker = tmp_path / "MARKER"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        # dcp.save pickles the non-tensor value with torch.save; __reduce__ runs here, its result never
        dcp.save({"w": torch.ones(3), "extra": _Payload(str(marker))}, checkpoint_id=str(folder), no_dist=True)
    assert not marker.exists()

    report = scan_globals(folder)
    assert "builtins.exec" in report.refused, report.to_dict()
    assert any("extra" in p for p in report.pickles)
    result = CliRunner().invoke(cli, ["check", str(folder)])
    assert result.exit_code == 1, result.output
    assert not marker.exists()

    # the control: dcp.load unpickles the entry for real (torch.load(weights_only=False))
    subprocess.run([sys.executable, "-c", _DCP_CONTROL, str(folder)], check=False, capture_output=True,
                   timeout=120, cwd=tmp_path)
    assert marker.exists()


def test_an_extension_code_is_refused_whether_or_not_the_reader_breaks_first(tmp_path: Path) -> None:
    # EXT1 names a global by a number from copyreg's registry: nothing in the file says which
    whole = tmp_path / "ext.pkl"
    whole.write_bytes(pickle_of(b"\x82\x01" + tup(s("x")) + b"R"))
    broken = tmp_path / "ext-after-break.pkl"  # BUILD on a dict breaks the reader before the EXT1
    broken.write_bytes(pickle_of(b"}}b0" + b"\x82\x01" + tup(s("x")) + b"R"))
    for path in (whole, broken):
        report = scan_globals(path)
        assert "copyreg extension 1" in report.refused, report.to_dict()
