"""torch.save files, zip and legacy: roots, ties, views, foreign objects, and hostile pickles."""

from __future__ import annotations

import argparse
import io
import os
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import weightsmith as ws
from weightsmith.errors import (
    CorruptCheckpointError,
    RootError,
    UnknownFormatError,
    UnsafeCheckpointError,
    WeightsmithError,
)


class AttributeDict(dict):
    """Like Lightning's ``AttributeDict``: a dict subclass the restricted reader must not construct."""

    def __getattr__(self, key: str) -> object:
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e


class RunsCode:
    """Unpickling it calls ``builtins.exec`` with code that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').write('x')",)


class RunsShell:
    """Unpickling it calls ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch '{self.marker}'",)


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(expected)
    for key, t in expected.items():
        assert loaded[key].dtype == t.dtype and loaded[key].shape == t.shape, key
        assert torch.equal(loaded[key], t), key


# plain and nested files ------------------------------------------------------------------------

def test_zip_state_dict(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "mlp.pt"
    torch.save(mlp.state_dict(), path)
    ckpt = ws.open(path)
    assert ckpt.format == "torch"
    assert ckpt.root == ""
    assert list(ckpt) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert ckpt["0.weight"].shape == (8, 4) and ckpt["0.weight"].dtype == "float32"
    assert ckpt.num_params == 49 and ckpt.nbytes == 49 * 4
    assert ckpt.ties == []
    assert_same(ckpt.load(), mlp.state_dict())
    assert torch.equal(ckpt.tensor("2.weight"), mlp[2].weight)


def test_nested_state_dict(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "nested.pth"
    torch.save({"state_dict": mlp.state_dict(), "epoch": 7}, path)
    ckpt = ws.open(path)
    assert ckpt.root == "state_dict"
    assert_same(ckpt.load(), mlp.state_dict())


def test_model_and_ema_roots(tmp_path: Path, mlp: nn.Module) -> None:
    ema = {k: v * 0.5 for k, v in mlp.state_dict().items()}
    path = tmp_path / "ema.pt"
    torch.save({"model": mlp.state_dict(), "model_ema": ema, "step": 100}, path)

    ckpt = ws.open(path)
    assert ckpt.root == "model"
    assert set(ckpt.roots) == {"model", "model_ema"}
    assert_same(ckpt.load(), mlp.state_dict())

    ema_ckpt = ws.open(path, root="model_ema")
    assert ema_ckpt.root == "model_ema"
    assert_same(ema_ckpt.load(), ema)

    with pytest.raises(RootError, match="model_ema"):  # the error lists the roots that exist
        ws.open(path, root="nope")
    with pytest.raises(RootError):
        ws.open(path, root="step")


def test_file_without_tensors_is_a_root_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(RootError, match="no state dict"):
        ws.open(path)


def test_lightning_like_checkpoint(tmp_path: Path, mlp: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    # A callback class from a helper module that no longer exists when the file is read.
    helper = tmp_path / "helpers"
    helper.mkdir()
    (helper / "ws_test_callbacks.py").write_text(
        "class EarlyStopping:\n"
        "    def __init__(self, patience):\n"
        "        self.patience = patience\n")
    monkeypatch.syspath_prepend(str(helper))
    import ws_test_callbacks  # type: ignore[import-not-found]

    opt = torch.optim.Adam(mlp.parameters())
    mlp(torch.randn(2, 4)).sum().backward()
    opt.step()
    ckpt_obj = {
        "state_dict": mlp.state_dict(),
        "hyper_parameters": argparse.Namespace(lr=1e-3, layers=[4, 8, 1]),
        "hparams": AttributeDict(lr=1e-3, name="mlp"),
        "epoch": 3,
        "optimizer_states": [opt.state_dict()],
        "callbacks": {"EarlyStopping": ws_test_callbacks.EarlyStopping(patience=5)},
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt_obj, path)
    monkeypatch.delitem(sys.modules, "ws_test_callbacks")
    (helper / "ws_test_callbacks.py").unlink()
    with pytest.raises(ModuleNotFoundError):  # torch.load could not rebuild it any more
        torch.load(path, weights_only=False)

    ckpt = ws.open(path)
    assert ckpt.root == "state_dict"
    assert_same(ckpt.load(), mlp.state_dict())
    others = ckpt.other_objects
    assert others["hyper_parameters"] == "argparse.Namespace"
    assert others["hparams"].endswith(".AttributeDict")
    assert others["callbacks/EarlyStopping"] == "ws_test_callbacks.EarlyStopping"
    assert any(r.startswith("optimizer_states") for r in ckpt.roots)  # an alternative, not the default

    optim = ws.open(path, root="optimizer_states/0/state/0")
    assert set(optim) == {"exp_avg", "exp_avg_sq", "step"}
    assert torch.equal(optim.load()["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_foreign_objects_are_never_constructed(tmp_path: Path, mlp: nn.Module,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An importable class whose unpickling hooks leave a marker: the reader must not trigger them."""
    marker = tmp_path / "constructed"
    helper = tmp_path / "helpers"
    helper.mkdir()
    (helper / "ws_test_noisy.py").write_text(
        "import pathlib\n"
        "class Noisy:\n"
        "    marker = None\n"
        "    def __setstate__(self, state):\n"
        "        pathlib.Path(state['marker']).write_text('built')\n"
        "        self.__dict__.update(state)\n")
    monkeypatch.syspath_prepend(str(helper))
    import ws_test_noisy  # type: ignore[import-not-found]

    noisy = ws_test_noisy.Noisy()
    noisy.marker = str(marker)
    path = tmp_path / "noisy.pt"
    torch.save({"state_dict": mlp.state_dict(), "extra": noisy}, path)
    monkeypatch.delitem(sys.modules, "ws_test_noisy")

    ckpt = ws.open(path)
    assert ckpt.other_objects["extra"] == "ws_test_noisy.Noisy"
    ckpt.load()
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the real unpickler does construct it: the check above can fail
    assert marker.read_text() == "built"


# legacy format, ties, views --------------------------------------------------------------------

def test_legacy_format(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "legacy.pt"
    sd = {**mlp.state_dict(), "steps": torch.arange(3), "half": torch.ones(2, 2, dtype=torch.float16)}
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    ckpt = ws.open(path)
    assert ckpt.format == "torch-legacy"
    assert any("legacy" in n for n in ckpt.notes)
    assert_same(ckpt.load(), sd)
    assert_same(ckpt.load(), torch.load(path, weights_only=True))


@pytest.mark.parametrize("legacy", [False, True])
def test_tied_tensors(tmp_path: Path, tied_mlp: nn.Module, legacy: bool) -> None:
    path = tmp_path / "tied.pt"
    torch.save(tied_mlp.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    ckpt = ws.open(path)
    assert sorted(ckpt.ties) == [("1.bias", "3.bias"), ("1.weight", "3.weight")]
    assert ckpt.num_params == 40 + 72 + 9
    loaded = ckpt.load()
    assert loaded["1.weight"] is loaded["3.weight"]
    assert loaded["1.bias"] is loaded["3.bias"]
    assert loaded["0.weight"] is not loaded["1.weight"]
    assert_same(loaded, tied_mlp.state_dict())


@pytest.mark.parametrize("legacy", [False, True])
def test_views_load_with_the_right_values(tmp_path: Path, legacy: bool) -> None:
    big = torch.arange(60.0)
    grid = big.view(6, 10)
    sd = {
        "big": big,
        "slice": big[7:19],
        "block": grid[1:4, 2:7],           # strided view into the middle
        "transposed": grid.t(),            # non-contiguous
        "column": grid[:, 3],
        "scalar": big[42],                 # 0-d view
        "other": torch.arange(5, dtype=torch.int64)[1:],
    }
    path = tmp_path / "views.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    ckpt = ws.open(path)
    assert ckpt.ties == []  # views of one storage are not ties unless they are the same view
    assert ckpt["block"].shape == (3, 5) and ckpt["scalar"].shape == ()
    assert_same(ckpt.load(), sd)


def test_casting_only_touches_floating_tensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    path = tmp_path / "bn.pt"
    torch.save(model.state_dict(), path)
    loaded = ws.open(path).load(device="cpu", dtype=torch.float16)
    assert loaded["0.weight"].dtype == torch.float16
    assert loaded["1.running_var"].dtype == torch.float16
    assert loaded["1.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(loaded["0.weight"], model[0].weight.detach().half())


# hostile files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_that_calls_exec_is_refused(tmp_path: Path, mlp: nn.Module, legacy: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": mlp.state_dict(), "payload": RunsCode(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError) as err:
        ws.open(path)
    assert "builtins.exec" in str(err.value) and str(path) in str(err.value)
    assert "trust=True" in str(err.value)
    assert err.value.globals == ("builtins.exec",)
    assert not marker.exists()


def test_pickle_that_calls_os_system_is_refused(tmp_path: Path, mlp: nn.Module) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({**mlp.state_dict(), "payload": RunsShell(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system"):
        ws.open(path)
    assert not marker.exists()


def test_trust_true_runs_the_pickle(tmp_path: Path, mlp: nn.Module) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": mlp.state_dict(), "payload": RunsCode(marker)}, path)
    ckpt = ws.open(path, trust=True)
    assert marker.exists()  # proves the refusal tests above would notice code running
    assert any("trust" in n for n in ckpt.notes)
    assert_same(ckpt.load(), mlp.state_dict())


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_archive_is_refused(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.script(mlp).save(str(path))
    with pytest.raises(UnsafeCheckpointError, match="TorchScript"):
        ws.open(path)


def _recompress(src: Path, dst: Path, *, which: str = "all") -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            deflate = which == "all" or "/data/" in info.filename
            zout.writestr(info.filename, zin.read(info),
                          compress_type=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)


def test_compressed_storage_is_refused_before_inflating(tmp_path: Path, mlp: nn.Module,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    plain = tmp_path / "plain.pt"
    torch.save(mlp.state_dict(), plain)
    packed = tmp_path / "packed.pt"
    _recompress(plain, packed)
    assert torch.equal(torch.load(packed)["0.weight"], mlp[0].weight)  # still a valid torch file

    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def spy(self: zipfile.ZipFile, name: object, *args: object, **kwargs: object) -> object:
        opened.append(getattr(name, "filename", name))
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    with pytest.raises(CorruptCheckpointError, match="is compressed.*refusing to inflate") as err:
        ws.open(packed)
    assert str(packed) in str(err.value)
    assert not any("/data/" in str(n) for n in opened)  # no storage was inflated


def test_compressed_pickle_with_stored_data_opens(tmp_path: Path, mlp: nn.Module) -> None:
    """Only the storages must be stored; a deflated data.pkl is small and is read."""
    plain = tmp_path / "plain.pt"
    torch.save(mlp.state_dict(), plain)
    mixed = tmp_path / "mixed.pt"
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(mixed, "w") as zout:
        for info in zin.infolist():
            kind = zipfile.ZIP_DEFLATED if info.filename.endswith("data.pkl") else zipfile.ZIP_STORED
            zout.writestr(info.filename, zin.read(info), compress_type=kind)
    assert_same(ws.open(mixed).load(), mlp.state_dict())


def test_plain_pickle_and_junk_are_not_torch_files(tmp_path: Path) -> None:
    import pickle

    pkl = tmp_path / "data.pt"
    pkl.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(UnknownFormatError):
        ws.open(pkl)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(UnknownFormatError):
        ws.open(junk)
    zf = tmp_path / "other.pt"
    with zipfile.ZipFile(zf, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(UnknownFormatError, match="data.pkl"):
        ws.open(zf)


@pytest.mark.parametrize("legacy", [False, True])
def test_every_truncation_is_a_weightsmith_error(tmp_path: Path, legacy: bool) -> None:
    torch.manual_seed(0)
    sd = {"w": torch.randn(3, 2), "b": torch.arange(4)}
    buf = io.BytesIO()
    torch.save(sd, buf, _use_new_zipfile_serialization=not legacy)
    data = buf.getvalue()
    assert len(data) < 3_000
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data)
    for n in reversed(range(len(data))):  # shortening in place is far cheaper than rewriting
        os.truncate(cut, n)
        try:
            ws.open(cut).load()
        except WeightsmithError:
            continue
        pytest.fail(f"truncated to {n} of {len(data)} bytes, the file still opened")
    cut.write_bytes(data)
    assert_same(ws.open(cut).load(), sd)


def test_truncated_zip_says_so(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "cut.pt"
    buf = io.BytesIO()
    torch.save(mlp.state_dict(), buf)
    path.write_bytes(buf.getvalue()[:-30])
    with pytest.raises(CorruptCheckpointError, match=r"without its central directory \(truncated\?\)"):
        ws.open(path)


def test_plain_python_values_need_no_trust(tmp_path: Path, mlp: nn.Module) -> None:
    """torch.save writes protocol 2 (``__builtin__.set``); such plain values are data, not code."""
    path = tmp_path / "extras.pt"
    torch.save({"state_dict": mlp.state_dict(), "tags": {"a", "b"}, "frozen": frozenset([1]),
                "z": complex(1, 2), "cut": slice(1, 5), "path": Path("/tmp/x")}, path)
    ckpt = ws.open(path)
    assert_same(ckpt.load(), mlp.state_dict())
    scanned = set(ckpt.reader.scan.globals)
    assert {"builtins.set", "builtins.frozenset", "builtins.complex", "builtins.slice"} <= scanned
    assert not any(g.startswith("__builtin__") for g in scanned)


def test_pickled_module_opens_only_with_trust(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "whole.pt"
    torch.save(mlp, path)
    with pytest.raises(RootError, match="trust=True") as err:
        ws.open(path)
    assert "torch.nn.modules.linear.Linear" in str(err.value)
    ckpt = ws.open(path, trust=True)
    assert_same(ckpt.load(), mlp.state_dict())


class Allocates:
    """Unpickles as ``bytearray(100_000_000)``: a few bytes of pickle asking for 100 MB."""

    def __reduce__(self) -> tuple:
        return bytearray, (100_000_000,)


def test_bytearray_of_a_size_is_refused(tmp_path: Path, mlp: nn.Module) -> None:
    import tracemalloc

    path = tmp_path / "bomb.pt"
    torch.save({"state_dict": mlp.state_dict(), "blob": Allocates(), "ok": bytearray(b"abc")}, path)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError, match=r"refusing bytearray\(int\)"):
            ws.open(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000


def test_bytearray_of_bytes_is_data(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "blob.pt"
    torch.save({"state_dict": mlp.state_dict(), "blob": bytearray(b"\x00\xffabc")}, path)
    ckpt = ws.open(path)
    assert ckpt.reader.scan.globals["builtins.bytearray"] == {"allowed"}
    assert_same(ckpt.load(), mlp.state_dict())


class InitRunsShell:
    """Unpickles as ``copyreg._reconstructor(Popen, Popen, cmd)``, which calls ``Popen.__init__(cmd)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import copyreg
        import subprocess

        return copyreg._reconstructor, (subprocess.Popen, subprocess.Popen, ["touch", str(self.marker)])


def test_reconstructor_calling_init_needs_trust(tmp_path: Path, mlp: nn.Module) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": mlp.state_dict(), "payload": InitRunsShell(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"subprocess\.Popen"):
        ws.open(path)
    assert not marker.exists()
    proc = torch.load(path, weights_only=False)["payload"]  # the payload is live: the check above can fail
    proc.wait()
    assert marker.exists()


def test_old_protocol_objects_need_no_trust(tmp_path: Path, mlp: nn.Module) -> None:
    """Protocols 0 and 1 rebuild plain objects through copyreg._reconstructor(cls, object, None)."""
    import pickle

    from weightsmith.io._pickle import scan_pickle

    for protocol in (0, 1):
        scan = scan_pickle(pickle.dumps({"args": argparse.Namespace(lr=0.1), "d": AttributeDict(a=1)},
                                        protocol=protocol))
        assert scan.called == (), protocol
        assert "argparse.Namespace" in scan.constructed
