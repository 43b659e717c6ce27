"""`weightsmith.save`: formats, ties, checksums, metadata, reports, and refusals."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import weightsmith as ws
from weightsmith.errors import SaveError
from weightsmith.io.safetensors import CHECKSUMS_KEY, TIES_KEY
from weightsmith.save import SaveReport, parse_size


def test_module_to_safetensors(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "mlp.safetensors"
    report = ws.save(mlp, path)
    assert isinstance(report, SaveReport)
    assert (report.format, report.tensors, report.nbytes, report.ties) == ("safetensors", 4, 196, {})
    assert report.files == [str(path)]
    reference = safetensors.torch.load_file(path)
    for key, t in mlp.state_dict().items():
        assert torch.equal(reference[key], t), key


def test_format_follows_the_suffix(tmp_path: Path, mlp: nn.Module) -> None:
    for suffix in (".pt", ".pth", ".bin", ".ckpt"):
        path = tmp_path / f"m{suffix}"
        assert ws.save(mlp, path).format == "torch"
        loaded = torch.load(path, weights_only=True)
        assert torch.equal(loaded["2.weight"], mlp[2].weight), suffix
    assert ws.save(mlp, tmp_path / "m.weights").format == "safetensors"
    assert ws.open(tmp_path / "m.weights").format == "safetensors"
    assert ws.save(mlp, tmp_path / "forced.pt", format="safetensors").format == "safetensors"
    assert ws.open(tmp_path / "forced.pt").format == "safetensors"


def test_torch_format_keeps_ties(tmp_path: Path, tied_mlp: nn.Module) -> None:
    path = tmp_path / "tied.pt"
    report = ws.save(tied_mlp, path)
    assert report.ties == {"3.weight": "1.weight", "3.bias": "1.bias"}
    assert report.tensors == 8
    loaded = torch.load(path, weights_only=True)
    assert loaded["1.weight"].data_ptr() == loaded["3.weight"].data_ptr()
    assert sorted(ws.open(path).ties) == [("1.bias", "3.bias"), ("1.weight", "3.weight")]


def test_safetensors_ties_metadata(tmp_path: Path, tied_mlp: nn.Module) -> None:
    path = tmp_path / "tied.safetensors"
    report = ws.save(tied_mlp, path)
    assert report.tensors == 8 and report.nbytes == (32 + 8 + 64 + 8 + 8 + 1) * 4
    with safetensors.safe_open(path, "pt") as f:
        assert json.loads(f.metadata()[TIES_KEY]) == {"3.weight": "1.weight", "3.bias": "1.bias"}


def test_views_of_one_tensor_are_not_ties(tmp_path: Path) -> None:
    base = torch.arange(10.0)
    sd = {"a": base[:5], "b": base[5:], "c": base[:5].clone()}
    path = tmp_path / "views.safetensors"
    assert ws.save(sd, path).ties == {}
    loaded = ws.open(path).load()
    for key, t in sd.items():
        assert torch.equal(loaded[key], t), key


def test_checksums_are_crc32_of_each_tensor(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "m.safetensors"
    ws.save(mlp, path)
    with safetensors.safe_open(path, "pt") as f:
        crcs = json.loads(f.metadata()[CHECKSUMS_KEY])
    for key, t in mlp.state_dict().items():
        expected = zlib.crc32(t.detach().contiguous().view(torch.uint8).numpy().tobytes()) & 0xFFFFFFFF
        assert crcs[key] == f"{expected:08x}", key

    plain = tmp_path / "plain.safetensors"
    ws.save(mlp, plain, checksums=False)
    with safetensors.safe_open(plain, "pt") as f:
        assert CHECKSUMS_KEY not in (f.metadata() or {})


def test_metadata(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "m.safetensors"
    ws.save(mlp, path, metadata={"format": "pt", "epoch": 3})  # type: ignore[dict-item]
    assert ws.open(path).metadata["epoch"] == "3"
    assert ws.open(path).metadata["format"] == "pt"
    with pytest.raises(SaveError, match="torch files carry no string metadata"):
        ws.save(mlp, tmp_path / "m.pt", metadata={"a": "b"})
    assert not (tmp_path / "m.pt").exists()


def test_saving_an_open_checkpoint(tmp_path: Path, tied_mlp: nn.Module) -> None:
    src = tmp_path / "src.pt"
    torch.save(tied_mlp.state_dict(), src)
    dst = tmp_path / "dst.safetensors"
    report = ws.save(ws.open(src), dst)
    assert report.ties == {"3.weight": "1.weight", "3.bias": "1.bias"}
    loaded = ws.open(dst).load()
    assert loaded["1.weight"] is loaded["3.weight"]
    for key, t in tied_mlp.state_dict().items():
        assert torch.equal(loaded[key], t), key


def test_progress(tmp_path: Path, mlp: nn.Module) -> None:
    calls: list[tuple[int, int, str]] = []
    ws.save(mlp, tmp_path / "m.safetensors", progress=lambda d, t, k: calls.append((d, t, k)))
    assert [c[2] for c in calls] == list(mlp.state_dict())
    assert [c[0] for c in calls] == [128, 160, 192, 196]
    assert {c[1] for c in calls} == {196}

    sharded: list[tuple[int, int, str]] = []
    ws.save(mlp, tmp_path / "sh", max_shard_size=40, progress=lambda d, t, k: sharded.append((d, t, k)))
    assert [c[0] for c in sharded] == [128, 160, 192, 196]
    assert {c[1] for c in sharded} == {196}


def test_report_renders_and_serializes(tmp_path: Path, tied_mlp: nn.Module) -> None:
    report = ws.save(tied_mlp, tmp_path / "m.safetensors")
    data = json.loads(report.to_json())
    assert data["schema"] == "weightsmith.save/1"
    assert data["tensors"] == 8 and data["ties"] == {"3.weight": "1.weight", "3.bias": "1.bias"}
    assert "saved 8 tensors" in str(report) and "2 tied key(s)" in str(report)


@pytest.mark.parametrize(("text", "expected"), [
    (1000, 1000), ("1000", 1000), ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("50KB", 50_000),
    ("2GiB", 2 * 2**30), ("1.5 MiB", 3 * 2**19), ("10 kb", 10_000),
])
def test_parse_size(text: int | str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", [0, -5, "five", "5XB", "", "GB"])
def test_parse_size_refuses(text: int | str) -> None:
    with pytest.raises(SaveError):
        parse_size(text)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_refusals(tmp_path: Path, mlp: nn.Module) -> None:
    with pytest.raises(SaveError, match="offending keys: b"):
        ws.save({"a": torch.ones(1), "b": [1, 2]}, tmp_path / "x.safetensors")
    with pytest.raises(SaveError, match="only string keys"):
        ws.save({1: torch.ones(1)}, tmp_path / "x.safetensors")
    with pytest.raises(SaveError, match="cannot save a list"):
        ws.save([torch.ones(1)], tmp_path / "x.safetensors")
    with pytest.raises(SaveError, match="unknown format 'onnx'"):
        ws.save(mlp, tmp_path / "x.onnx", format="onnx")
    with pytest.raises(SaveError, match="max_shard_size"):
        ws.save(mlp, tmp_path / "folder", format="sharded")
    with pytest.raises(SaveError, match="cannot store"):
        ws.save({"q": torch.ones(2, dtype=torch.complex32)}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []  # nothing half-written anywhere
