"""`weightsmith.open` and `Checkpoint`: detection, the mapping, loading, casting, progress, a real model."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import weightsmith as ws
from weightsmith.errors import CheckpointNotFoundError, UnknownFormatError


# the real checkpoint ------------------------------------------------------------------------

def test_minilm_header(minilm_dir: Path) -> None:
    ckpt = ws.open(minilm_dir)
    assert ckpt.format == "safetensors"
    assert ckpt.path == minilm_dir / "model.safetensors"
    with safetensors.safe_open(minilm_dir / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        reference = sum(_numel(f.get_slice(k).get_shape()) for k in keys)
    assert len(ckpt) == len(keys) == 104
    assert set(ckpt) == set(keys)
    assert ckpt.num_params == reference == 22_713_728
    assert ckpt["embeddings.position_ids"].dtype == "int64"
    assert ckpt["embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert "104 tensors, 22,713,728 parameters" in repr(ckpt)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_minilm_values(minilm_dir: Path) -> None:
    reference = safetensors.torch.load_file(minilm_dir / "model.safetensors")
    loaded = ws.open(minilm_dir).load()
    assert set(loaded) == set(reference)
    for key, t in reference.items():
        assert loaded[key].dtype == t.dtype and torch.equal(loaded[key], t), key
    assert loaded["embeddings.position_ids"].dtype == torch.int64


# detection ----------------------------------------------------------------------------------

def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no such file") as err:
        ws.open(tmp_path / "nope.safetensors")
    assert isinstance(err.value, FileNotFoundError)


def test_format_is_detected_by_content_not_suffix(tmp_path: Path, mlp: nn.Module) -> None:
    st = tmp_path / "weights.pt"  # a safetensors file with a torch suffix
    safetensors.torch.save_file(mlp.state_dict(), st)
    assert ws.open(st).format == "safetensors"
    tf = tmp_path / "weights.bin"
    torch.save(mlp.state_dict(), tf)
    assert ws.open(tf).format == "torch"
    noext = tmp_path / "weights"
    torch.save(mlp.state_dict(), noext)
    assert ws.open(noext).format == "torch"


def test_folders(tmp_path: Path, mlp: nn.Module) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    torch.save(mlp.state_dict(), hf / "pytorch_model.bin")
    (hf / "config.json").write_text("{}")
    assert ws.open(hf).format == "torch"

    single = tmp_path / "single"
    single.mkdir()
    safetensors.torch.save_file(mlp.state_dict(), single / "weights.safetensors")
    assert ws.open(single).path == single / "weights.safetensors"

    many = tmp_path / "many"
    many.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        safetensors.torch.save_file(mlp.state_dict(), many / name)
    with pytest.raises(UnknownFormatError, match="several checkpoint files"):
        ws.open(many)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UnknownFormatError, match="no checkpoint"):
        ws.open(empty)


def test_unknown_content(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(UnknownFormatError):
        ws.open(path)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ws.CorruptCheckpointError):
        ws.open(empty)


# the mapping and loading ----------------------------------------------------------------------

@pytest.fixture(params=["safetensors", "torch"])
def saved(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    sd = {**model.state_dict(), "mask": torch.tensor([True, False, True])}
    path = tmp_path / ("m.safetensors" if request.param == "safetensors" else "m.pt")
    ws.save(sd, path)
    return path, sd


def test_mapping(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, sd = saved
    ckpt = ws.open(path)
    assert list(ckpt) == list(sd)
    assert len(ckpt) == len(sd)
    assert "0.weight" in ckpt and "nope" not in ckpt
    with pytest.raises(KeyError, match="nope"):
        ckpt["nope"]
    with pytest.raises(KeyError, match="nope"):
        ckpt.tensor("nope")
    with pytest.raises(KeyError, match="nope"):
        ckpt.load(["0.weight", "nope"])
    assert ckpt.nbytes == sum(t.numel() * t.element_size() for t in sd.values())
    assert ckpt["1.num_batches_tracked"].shape == () and ckpt["1.num_batches_tracked"].dtype == "int64"


def test_tensor_and_partial_load(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, sd = saved
    ckpt = ws.open(path)
    assert torch.equal(ckpt.tensor("2.weight"), sd["2.weight"])
    assert ckpt.tensor("2.weight", dtype=torch.float64).dtype == torch.float64
    part = ckpt.load(["0.bias", "mask"])
    assert list(part) == ["0.bias", "mask"]
    assert torch.equal(part["mask"], sd["mask"])


def test_load_casts_floating_tensors_only(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, sd = saved
    loaded = ws.open(path).load(device="cpu", dtype=torch.float16)
    for key, t in sd.items():
        if t.is_floating_point():
            assert loaded[key].dtype == torch.float16, key
            assert torch.equal(loaded[key], t.half()), key
        else:
            assert loaded[key].dtype == t.dtype, key
            assert torch.equal(loaded[key], t), key
    assert loaded["1.num_batches_tracked"].dtype == torch.int64
    assert loaded["mask"].dtype == torch.bool


def test_progress_counts_up_to_the_total(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, sd = saved
    calls: list[tuple[int, int, str]] = []
    ckpt = ws.open(path)
    ckpt.load(progress=lambda done, total, key: calls.append((done, total, key)))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    assert [key for _, _, key in calls] == list(sd)
    dones = [done for done, _, _ in calls]
    assert all(a < b for a, b in zip(dones, dones[1:]))  # every tensor here has data
    assert all(t == total for _, t, _ in calls)
    assert dones[-1] == total


def test_tied_load_shares_one_tensor(tmp_path: Path, tied_mlp: nn.Module) -> None:
    for path in (tmp_path / "t.safetensors", tmp_path / "t.pt"):
        ws.save(tied_mlp, path)
        loaded = ws.open(path).load(dtype=torch.float16)
        assert loaded["1.weight"] is loaded["3.weight"], path
        assert loaded["1.weight"].dtype == torch.float16
        calls: list[int] = []
        ws.open(path).load(progress=lambda d, t, k: calls.append(t))
        assert calls[-1] == (32 + 8 + 64 + 8 + 64 + 8 + 8 + 1) * 4  # each key's bytes, as loaded


def test_close_keeps_returned_tensors(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "m.safetensors"
    ws.save(mlp, path)
    with ws.open(path) as ckpt:
        t = ckpt.tensor("0.weight")
    assert torch.equal(t, mlp[0].weight)
    assert torch.equal(ckpt.tensor("0.bias"), mlp[0].bias)  # reopens the mapping on demand


@pytest.mark.parametrize("name", ["m.safetensors", "m.pt", "sharded", "dcp"])
def test_close_unmaps_every_file(tmp_path: Path, mlp: nn.Module, name: str) -> None:
    import gc

    path = tmp_path / name
    options = {"sharded": {"max_shard_size": 100}, "dcp": {"format": "dcp"}}.get(name, {})
    ws.save(mlp, path, **options)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".distcp"))
    assert len(files) > (1 if name == "sharded" else 0)

    def mapped() -> set[str]:
        maps = Path("/proc/self/maps").read_text()
        return {f.name for f in files if str(f) in maps}

    ckpt = ws.open(path)
    values = {k: ckpt.tensor(k).clone() for k in ckpt}
    assert mapped() == {f.name for f in files}
    ckpt.close()
    gc.collect()
    assert mapped() == set()
    assert all(torch.equal(values[k], v) for k, v in mlp.state_dict().items())


def test_loaded_values_feed_a_model(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "m.pt"
    ws.save(mlp, path)
    torch.manual_seed(5)
    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(3, 4)
    assert not torch.equal(fresh(x), mlp(x))
    fresh.load_state_dict(ws.open(path).load())
    assert torch.equal(fresh(x), mlp(x))
