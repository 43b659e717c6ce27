"""Odd inputs that escaped as other exception types: each is a WeightsmithError naming the file."""

from __future__ import annotations

import dataclasses
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch

import weightsmith as ws
from weightsmith.errors import CorruptCheckpointError

DEEP = 100_000  # levels: past the JSON parser's recursion limit


def _safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_a_safetensors_header_nested_100000_deep_is_corrupt(tmp_path: Path) -> None:
    path = _safetensors(tmp_path / "deep.safetensors", b'{"a":' + b"[" * DEEP + b"]" * DEEP + b"}")
    with pytest.raises(CorruptCheckpointError, match=r"deep\.safetensors: header JSON is nested too deeply"):
        ws.open(path)


def test_tie_metadata_nested_100000_deep_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "ties.safetensors"
    ws.save({"a": torch.ones(2)}, path, metadata={"weightsmith.ties": "[" * DEEP + "]" * DEEP})
    with pytest.raises(CorruptCheckpointError, match=r"ties\.safetensors: metadata 'weightsmith\.ties'"):
        ws.open(path)


def test_a_sharded_index_nested_100000_deep_is_corrupt(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": ' + "[" * DEEP + "]" * DEEP + "}")
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors\.index\.json: the index is not valid JSON"):
        ws.open(tmp_path)


def _index(path: Path, weight_map: dict[str, str]) -> None:
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_a_sharded_index_naming_itself_is_corrupt(tmp_path: Path) -> None:
    _index(tmp_path / "model.safetensors.index.json", {"w": "model.safetensors.index.json"})
    with pytest.raises(CorruptCheckpointError,
                       match=r"model\.safetensors\.index\.json: shard 'model\.safetensors\.index\.json' is a sharded"):
        ws.open(tmp_path)


def test_two_sharded_indexes_naming_each_other_are_corrupt(tmp_path: Path) -> None:
    _index(tmp_path / "model.safetensors.index.json", {"w": "other.index.json"})
    _index(tmp_path / "other.index.json", {"w": "model.safetensors.index.json"})
    with pytest.raises(CorruptCheckpointError, match=r"shard 'other\.index\.json' is a sharded checkpoint"):
        ws.open(tmp_path)


def test_a_shard_that_is_a_dcp_folder_is_refused(tmp_path: Path) -> None:
    ws.save({"w": torch.ones(2)}, tmp_path / "inner", format="dcp")
    _index(tmp_path / "model.safetensors.index.json", {"w": "inner"})
    with pytest.raises(ws.WeightsmithError, match=r"shard 'inner'"):
        ws.open(tmp_path)


def _dcp_of_2_40_elements(folder: Path, *, length: int | None) -> Path:
    """A DCP folder whose metadata declares a float32 tensor of 2**40 elements in two chunks."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    ws.save({"w": torch.ones(4)}, folder, format="dcp")
    meta = FileSystemReader(str(folder)).read_metadata()  # our own file, just written
    entry = meta.state_dict_metadata["w"]
    stored = next(iter(meta.storage_data.values()))
    half = 2**39
    entry.size = torch.Size([2**40])
    entry.chunks = [ChunkStorageMetadata(offsets=torch.Size([o]), sizes=torch.Size([half])) for o in (0, half)]
    stored = dataclasses.replace(stored, length=stored.length if length is None else length)
    meta.storage_data = {MetadataIndex("w", torch.Size([o])): stored for o in (0, half)}
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    return folder


def test_a_dcp_tensor_of_2_40_elements_over_a_small_file_is_refused_at_open(tmp_path: Path) -> None:
    folder = _dcp_of_2_40_elements(tmp_path / "dcp", length=None)
    with pytest.raises(CorruptCheckpointError,
                       match=r"\.metadata: the chunk of 'w' at \[0\] holds 549,755,813,888 float32 elements"):
        ws.open(folder)


def test_a_dcp_tensor_whose_chunks_claim_bytes_the_file_lacks_is_refused_before_allocating(tmp_path: Path) -> None:
    # the metadata's lengths are large enough; the data file is not: refused before 4 TiB is allocated
    folder = _dcp_of_2_40_elements(tmp_path / "dcp", length=2**41 + 4096)
    ckpt = ws.open(folder)
    assert ckpt["w"].nbytes == 4 * 2**40
    with pytest.raises(CorruptCheckpointError, match=r"__0_0\.distcp: 'w' is stored at bytes .*truncated"):
        ckpt.tensor("w")
