"""Sharded folders: weightsmith's own, Hugging Face's, and indexes that lie or point outside."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import weightsmith as ws
from weightsmith.errors import CheckpointNotFoundError, CorruptCheckpointError, WeightsmithError

INDEX = "model.safetensors.index.json"


def tiny_bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, vocab_size=99)
    return transformers.BertModel(config).eval()


def shards_of(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def read_index(folder: Path) -> dict:
    return json.loads((folder / INDEX).read_text())


def write_index(folder: Path, weight_map: dict[str, str]) -> None:
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# weightsmith's own shards --------------------------------------------------------------------

def test_save_sharded_round_trip(tmp_path: Path, mlp: nn.Module) -> None:
    folder = tmp_path / "out"
    report = ws.save(mlp, folder, max_shard_size=40)  # 0.weight alone is 128 bytes
    assert report.format == "sharded"
    assert shards_of(folder) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    sizes = [sum(t.numel() * t.element_size() for t in safetensors.torch.load_file(folder / n).values())
             for n in shards_of(folder)]
    assert sizes == [128, 32, 36]  # over the limit only where one tensor is larger than it
    index = read_index(folder)
    assert index["metadata"]["total_size"] == 49 * 4
    assert set(index["weight_map"]) == set(mlp.state_dict())

    ckpt = ws.open(folder)
    assert ckpt.format == "sharded"
    assert sorted(ckpt) == sorted(mlp.state_dict())  # the index lists keys sorted, as Hugging Face's does
    assert set(ckpt.reader.shards) == set(shards_of(folder))
    loaded = ckpt.load()
    for key, t in mlp.state_dict().items():
        assert torch.equal(loaded[key], t), key
        assert ckpt[key].file == index["weight_map"][key]
    # also readable without weightsmith, shard by shard
    merged = {}
    for name in shards_of(folder):
        merged.update(safetensors.torch.load_file(folder / name))
    assert set(merged) == set(mlp.state_dict())


def test_save_sharded_keeps_ties(tmp_path: Path, tied_mlp: nn.Module) -> None:
    folder = tmp_path / "tied"
    report = ws.save(tied_mlp, folder, max_shard_size=300)
    assert report.ties == {"3.weight": "1.weight", "3.bias": "1.bias"}
    assert len(shards_of(folder)) >= 2
    ckpt = ws.open(folder)
    assert set(ckpt) == set(tied_mlp.state_dict())
    assert sorted(ckpt.ties) == [("1.bias", "3.bias"), ("1.weight", "3.weight")]
    assert ckpt.num_params == 40 + 72 + 9
    loaded = ckpt.load()
    assert loaded["1.weight"] is loaded["3.weight"]
    for key, t in tied_mlp.state_dict().items():
        assert torch.equal(loaded[key], t), key


def test_index_json_path_opens_too(tmp_path: Path, mlp: nn.Module) -> None:
    folder = tmp_path / "out"
    ws.save(mlp, folder, max_shard_size=100)
    assert list(ws.open(folder / INDEX)) == list(ws.open(folder))


# Hugging Face ------------------------------------------------------------------------------

def test_transformers_sharded_folder_opens(tmp_path: Path) -> None:
    model = tiny_bert()
    folder = tmp_path / "hf"
    model.save_pretrained(folder, max_shard_size="50KB")
    assert len(shards_of(folder)) >= 2 and (folder / INDEX).is_file()

    ckpt = ws.open(folder)
    assert ckpt.format == "sharded"
    expected = model.state_dict()
    assert set(ckpt) == set(expected)
    loaded = ckpt.load()
    for key, t in expected.items():
        assert loaded[key].dtype == t.dtype and torch.equal(loaded[key], t), key
    assert ckpt.num_params == sum(t.numel() for t in expected.values())


def test_weightsmith_shards_load_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = tiny_bert()
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    folder = tmp_path / "ws"
    ws.save(model, folder, max_shard_size="50KB")
    assert len(shards_of(folder)) >= 2
    shutil.copy(hf / "config.json", folder / "config.json")

    again, info = transformers.BertModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.tensor([[2, 7, 11, 5, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, again.eval()(ids).last_hidden_state)


# hostile or inconsistent indexes -------------------------------------------------------------

@pytest.fixture
def two_shards(tmp_path: Path) -> Path:
    """A folder with shards a.safetensors {x, y} and b.safetensors {z} and a matching index."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    safetensors.torch.save_file({"x": torch.ones(2), "y": torch.zeros(3)}, folder / "a.safetensors")
    safetensors.torch.save_file({"z": torch.arange(4)}, folder / "b.safetensors")
    write_index(folder, {"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors"})
    return folder


def test_the_fixture_is_valid(two_shards: Path) -> None:
    loaded = ws.open(two_shards).load()
    assert loaded["z"].tolist() == [0, 1, 2, 3] and loaded["x"].tolist() == [1.0, 1.0]


def test_parent_path_in_index_is_refused(two_shards: Path) -> None:
    outside = two_shards.parent / "x.safetensors"
    safetensors.torch.save_file({"z": torch.arange(4)}, outside)
    write_index(two_shards, {"x": "a.safetensors", "y": "a.safetensors", "z": "../x.safetensors"})
    with pytest.raises(CorruptCheckpointError, match=r"\.\./x\.safetensors.*leads out"):
        ws.open(two_shards)


def test_absolute_path_in_index_is_refused(two_shards: Path) -> None:
    outside = two_shards.parent / "abs.safetensors"
    safetensors.torch.save_file({"z": torch.arange(4)}, outside)
    write_index(two_shards, {"x": "a.safetensors", "y": "a.safetensors", "z": str(outside)})
    with pytest.raises(CorruptCheckpointError, match="leads out"):
        ws.open(two_shards)


def test_symlink_out_of_the_folder_is_refused(two_shards: Path) -> None:
    outside = two_shards.parent / "elsewhere.safetensors"
    (two_shards / "b.safetensors").rename(outside)
    (two_shards / "b.safetensors").symlink_to(outside)
    with pytest.raises(CorruptCheckpointError, match=r"outside .*\(symlink\?\)") as err:
        ws.open(two_shards)
    assert "b.safetensors" in str(err.value)


def test_symlink_inside_the_folder_is_fine(two_shards: Path) -> None:
    (two_shards / "b.safetensors").rename(two_shards / "real-b.safetensors")
    (two_shards / "b.safetensors").symlink_to(two_shards / "real-b.safetensors")
    assert ws.open(two_shards).load()["z"].tolist() == [0, 1, 2, 3]


def test_missing_shard(two_shards: Path) -> None:
    (two_shards / "b.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="'b.safetensors'.*missing"):
        ws.open(two_shards)


def test_tensor_in_two_shards(two_shards: Path) -> None:
    safetensors.torch.save_file({"z": torch.arange(4), "x": torch.ones(2)}, two_shards / "b.safetensors")
    with pytest.raises(CorruptCheckpointError, match="'x' is stored in two shards"):
        ws.open(two_shards)


def test_tensor_missing_from_the_index(two_shards: Path) -> None:
    write_index(two_shards, {"x": "a.safetensors", "z": "b.safetensors"})
    with pytest.raises(CorruptCheckpointError, match="missing from the index.*'y'"):
        ws.open(two_shards)


def test_index_key_missing_from_its_shard(two_shards: Path) -> None:
    write_index(two_shards, {"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors",
                             "ghost": "b.safetensors"})
    with pytest.raises(CorruptCheckpointError, match="'ghost'.*in no shard"):
        ws.open(two_shards)


def test_index_names_the_wrong_shard(two_shards: Path) -> None:
    write_index(two_shards, {"x": "b.safetensors", "y": "a.safetensors", "z": "b.safetensors"})
    with pytest.raises(CorruptCheckpointError, match="'x'.*in 'a.safetensors'"):
        ws.open(two_shards)


@pytest.mark.parametrize("text", ["not json", "[]", '{"weight_map": {}}', '{"weight_map": {"x": 3}}'])
def test_broken_index_json(two_shards: Path, text: str) -> None:
    (two_shards / INDEX).write_text(text)
    with pytest.raises(CorruptCheckpointError, match="(the index is not valid JSON|the index has no|'weight_map' must map)"):
        ws.open(two_shards)


def test_corrupt_shard_is_reported(two_shards: Path) -> None:
    data = (two_shards / "b.safetensors").read_bytes()
    (two_shards / "b.safetensors").write_bytes(data[:-3])
    with pytest.raises(WeightsmithError, match="b.safetensors"):
        ws.open(two_shards)
