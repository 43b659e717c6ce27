"""DCP folders in one process: restricted reading, conversions both ways, atomic and async saving,
and damaged or hostile folders refused with the file and key named."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import weightsmith as ws
from weightsmith.distributed import WeightsmithDcpReader
from weightsmith.errors import CorruptCheckpointError, SaveError, UnsafeCheckpointError


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(bits(a[k]), bits(b[k])) for k in a)


class RunsShell:
    """A pickle payload that creates ``marker`` when unpickled for real."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch '{self.marker}'",)


def torch_zip(payload: bytes) -> bytes:
    """A torch.save-shaped archive whose data.pkl is ``payload``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


def dcp_load(state: dict, folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.load(state, storage_reader=WeightsmithDcpReader(str(folder)), no_dist=True)


def rewrite_metadata(folder: Path, edit) -> None:
    """Change our own, trusted ``.metadata`` (it was written by this test) through ``edit(meta)``."""
    meta = pickle.loads((folder / ".metadata").read_bytes())
    edit(meta)
    (folder / ".metadata").write_bytes(pickle.dumps(meta))


@pytest.fixture
def state(mlp: nn.Module) -> dict[str, torch.Tensor]:
    return {**{k: v.detach().clone() for k, v in mlp.state_dict().items()},
            "steps": torch.arange(6, dtype=torch.int64).reshape(2, 3), "half": torch.ones(5, dtype=torch.bfloat16)}


@pytest.fixture
def folder(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    report = ws.save({**state, "epoch": 3, "note": {"lr": 0.5, "tags": ["a", "b"]}}, tmp_path / "ckpt", format="dcp")
    assert report.format == "dcp" and report.tensors == len(state)
    return tmp_path / "ckpt"


def test_open_reads_every_tensor_of_a_dcp_folder(folder: Path, state: dict[str, torch.Tensor]) -> None:
    ckpt = ws.open(folder)
    assert ckpt.format == "dcp"
    assert same(ckpt.load(), state)
    assert ckpt.other_objects == {"epoch": "bytes", "note.lr": "bytes", "note.tags": "bytes"}
    # one process wrote one chunk per tensor: its bytes lie inside that chunk's range of the file
    (chunk,) = ckpt.reader.layout["0.weight"]
    blob = (folder / chunk.file).read_bytes()[chunk.byte_offset:chunk.byte_offset + chunk.length]
    assert bits(ckpt.tensor("0.weight")).numpy().tobytes() in blob


def test_inspect_stats_diff_and_convert_stream_a_dcp_folder(folder: Path, tmp_path: Path,
                                                           state: dict[str, torch.Tensor]) -> None:
    assert {r.name: r.shape for r in ws.summary(folder).rows} == {k: tuple(v.shape) for k, v in state.items()}
    stats = ws.stats(folder)
    assert stats["0.weight"].mean == pytest.approx(state["0.weight"].mean().item(), abs=1e-6)
    assert ws.diff(folder, state).equal
    changed = {**state, "2.bias": state["2.bias"] + 1}
    assert not ws.diff(folder, changed).equal
    ws.convert(folder, tmp_path / "out.safetensors", verify=True)
    assert same(ws.open(tmp_path / "out.safetensors").load(), state)
    ws.convert(folder, tmp_path / "sharded", max_shard_size=200)
    assert same(ws.open(tmp_path / "sharded").load(), state)


def test_safetensors_and_sharded_folders_convert_to_dcp(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    ws.save(state, tmp_path / "model.safetensors")
    ws.save(state, tmp_path / "hf", max_shard_size=200)
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    ws.save(ws.open(tmp_path / "model.safetensors"), tmp_path / "from_single", format="dcp")
    ws.save(ws.open(tmp_path / "hf"), tmp_path / "from_sharded", format="dcp")
    assert same(ws.open(tmp_path / "from_single").load(), state)
    assert same(ws.open(tmp_path / "from_sharded").load(), state)
    assert ws.diff(tmp_path / "from_sharded", tmp_path / "model.safetensors").equal


def test_dcp_load_through_the_restricted_reader(folder: Path, state: dict[str, torch.Tensor]) -> None:
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    target.update({"epoch": 0, "note": {"lr": 0.0, "tags": []}})
    dcp_load(target, folder)
    assert same({k: target[k] for k in state}, state)
    assert target["epoch"] == 3 and target["note"] == {"lr": 0.5, "tags": ["a", "b"]}


def test_a_plain_model_loads_from_a_dcp_folder(tmp_path: Path, mlp: nn.Module) -> None:
    ws.save(mlp, tmp_path / "ckpt", format="dcp")
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    weight = other[0].weight
    report = ws.load_(other, tmp_path / "ckpt")
    assert report.loaded == 4
    assert same(other.state_dict(), mlp.state_dict()) and other[0].weight is weight


def test_truncated_data_file_names_the_file_and_the_key(folder: Path) -> None:
    ckpt = ws.open(folder)
    chunk = ckpt.reader.layout["2.weight"][0]
    data = folder / chunk.file
    original = data.read_bytes()
    for cut in (chunk.byte_offset + chunk.length - 1, chunk.byte_offset + chunk.length // 2,
                chunk.byte_offset + 10):
        data.write_bytes(original[:cut])
        with pytest.raises(CorruptCheckpointError, match=r"__0_0\.distcp.*'2\.weight'.*truncated"):
            ws.open(folder).tensor("2.weight")
        target = {"2.weight": torch.zeros(1, 8)}
        with pytest.raises(BaseException, match=r"__0_0\.distcp.*'2\.weight'"):
            dcp_load(target, folder)
        assert torch.equal(target["2.weight"], torch.zeros(1, 8))
    data.write_bytes(original)
    assert ws.open(folder).tensor("2.weight").shape == (1, 8)


def test_damaged_chunk_bytes_are_corrupt_not_a_crash(folder: Path) -> None:
    ckpt = ws.open(folder)
    chunk = ckpt.reader.layout["0.weight"][0]
    data = folder / chunk.file
    raw = bytearray(data.read_bytes())
    raw[chunk.byte_offset + chunk.length - 22: chunk.byte_offset + chunk.length] = b"\0" * 22  # the end record
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match=r"'0\.weight'"):
        ws.open(folder).tensor("0.weight")
    assert ws.open(folder).tensor("0.bias").shape == (8,)  # its neighbour still reads


def test_metadata_disagreeing_with_the_chunks_is_corrupt(folder: Path) -> None:
    def wider(meta) -> None:
        meta.state_dict_metadata["0.bias"].size = torch.Size([9])

    rewrite_metadata(folder, wider)
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata.*'0\.bias'.*8 elements.*\[9\]"):
        ws.open(folder)

    def retyped(meta) -> None:
        meta.state_dict_metadata["0.bias"].size = torch.Size([8])
        meta.state_dict_metadata["0.bias"].properties.dtype = torch.float64

    rewrite_metadata(folder, retyped)
    with pytest.raises(CorruptCheckpointError, match=r"'0\.bias'.*float32.*float64"):
        ws.open(folder).tensor("0.bias")


def test_metadata_that_calls_os_system_never_runs(folder: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned-metadata"
    (folder / ".metadata").write_bytes(pickle.dumps(RunsShell(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata.*(posix|os)\.system"):
        WeightsmithDcpReader(str(folder)).read_metadata()
    with pytest.raises(BaseException, match=r"(posix|os)\.system"):
        dcp_load({"0.bias": torch.zeros(8)}, folder)
    assert not marker.exists()
    pickle.loads((folder / ".metadata").read_bytes())  # the payload is live: the checks above can fail
    assert marker.exists()


def test_chunk_and_object_pickles_that_call_code_never_run(folder: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned-chunk"
    evil = torch_zip(pickle.dumps(RunsShell(marker), protocol=2))
    (folder / "__evil.distcp").write_bytes(evil)
    ckpt = ws.open(folder)
    first = ckpt.reader.layout["0.bias"][0]

    def point_at_evil(meta) -> None:
        for index, info in meta.storage_data.items():
            if index.fqn in ("0.bias", "epoch"):
                info.relative_path, info.offset, info.length = "__evil.distcp", 0, len(evil)

    rewrite_metadata(folder, point_at_evil)
    with pytest.raises(UnsafeCheckpointError, match=r"__evil\.distcp.*'0\.bias'.*(posix|os)\.system"):
        ws.open(folder).tensor("0.bias")
    with pytest.raises(BaseException, match=r"(posix|os)\.system"):
        dcp_load({"0.bias": torch.zeros(8)}, folder)
    with pytest.raises(BaseException, match=r"(posix|os)\.system"):
        dcp_load({"epoch": 0}, folder)
    assert not marker.exists()
    assert first.file != "__evil.distcp"
    pickle.loads(zipfile.ZipFile(io.BytesIO(evil)).read("archive/data.pkl"))  # live payload
    assert marker.exists()


def test_object_entries_that_are_not_plain_values_are_refused(tmp_path: Path, folder: Path) -> None:
    blob = torch_zip(pickle.dumps(argparse.Namespace(lr=0.1), protocol=2))
    (folder / "__ns.distcp").write_bytes(blob)

    def point(meta) -> None:
        for index, info in meta.storage_data.items():
            if index.fqn == "epoch":
                info.relative_path, info.offset, info.length = "__ns.distcp", 0, len(blob)

    rewrite_metadata(folder, point)
    target = {"epoch": 0}
    with pytest.raises(BaseException, match=r"'epoch'.*argparse\.Namespace"):
        dcp_load(target, folder)
    assert target == {"epoch": 0}


def test_saving_replaces_the_folder_atomically(tmp_path: Path, state: dict[str, torch.Tensor],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt"
    ws.save(state, path, format="dcp")
    newer = {k: v + 1 for k, v in state.items()}
    ws.save(newer, path, format="dcp")
    assert same(ws.open(path).load(), newer)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def disk_full(self, plan, planner):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", disk_full)
    with pytest.raises(SaveError, match="No space left.*previous folder is intact"):
        ws.save(state, path, format="dcp")
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging folder left behind


def test_saving_refuses_what_dcp_would_pickle_as_code(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(SaveError, match=r"cfg: a Namespace") as err:
        ws.save({**state, "cfg": argparse.Namespace(lr=0.1), 3: torch.ones(1)}, tmp_path / "ckpt", format="dcp")
    assert "key 3 is not a string" in str(err.value)
    assert not (tmp_path / "ckpt").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(SaveError, match="async_save needs format='dcp'"):
        ws.save(state, tmp_path / "x.safetensors", async_save=True)


def test_async_save_without_a_process_group(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    future = ws.save(state, tmp_path / "ckpt", format="dcp", async_save=True)
    report = future.result(timeout=60)
    assert report.path == str(tmp_path / "ckpt") and report.tensors == len(state)
    assert same(ws.open(tmp_path / "ckpt").load(), state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
