"""torch.distributed.checkpoint folders: metadata listing, layout, and damaged or hostile metadata."""

from __future__ import annotations

import os
import pickle
import random
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import weightsmith as ws
from weightsmith.errors import CorruptCheckpointError, UnsafeCheckpointError


def dcp_save(state: dict, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(state, checkpoint_id=folder, no_dist=True)


class RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch '{self.marker}'",)


@pytest.fixture
def dcp_dir(tmp_path: Path, mlp: nn.Module) -> Path:
    folder = tmp_path / "dcp"
    state = {**mlp.state_dict(), "steps": torch.arange(6, dtype=torch.int64).reshape(2, 3),
             "half": torch.ones(5, dtype=torch.bfloat16), "epoch": 3}
    dcp_save(state, folder)
    assert (folder / ".metadata").is_file()
    return folder


def test_dcp_lists_keys_shapes_dtypes(dcp_dir: Path, mlp: nn.Module) -> None:
    ckpt = ws.open(dcp_dir)
    assert ckpt.format == "dcp"
    expected = {**{k: (tuple(v.shape), "float32") for k, v in mlp.state_dict().items()},
                "steps": ((2, 3), "int64"), "half": ((5,), "bfloat16")}
    assert {k: (ckpt[k].shape, ckpt[k].dtype) for k in ckpt} == expected
    assert ckpt["0.weight"].nbytes == 8 * 4 * 4 and ckpt["half"].nbytes == 10
    assert ckpt.num_params == 49 + 6 + 5
    assert ckpt.other_objects == {"epoch": "bytes"}


def test_dcp_layout_chunks(dcp_dir: Path) -> None:
    ckpt = ws.open(dcp_dir)
    layout = ckpt.reader.layout
    assert set(layout) == set(ckpt)
    data_files = {p.name for p in dcp_dir.glob("*.distcp")}
    for key, chunks in layout.items():
        assert len(chunks) == 1, key  # one process: each tensor is one whole chunk
        (chunk,) = chunks
        assert chunk.offsets == (0,) * len(ckpt[key].shape)
        assert chunk.sizes == ckpt[key].shape
        assert chunk.file in data_files
        assert chunk.byte_offset is not None and chunk.length is not None and chunk.length > 0
        assert chunk.byte_offset + chunk.length <= (dcp_dir / chunk.file).stat().st_size
    spans = sorted((c.byte_offset, c.byte_offset + c.length) for v in layout.values() for c in v)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # chunks do not overlap


def test_dcp_agrees_with_torch_metadata(dcp_dir: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(dcp_dir)).read_metadata()
    ckpt = ws.open(dcp_dir)
    for key, entry in meta.state_dict_metadata.items():
        if hasattr(entry, "size"):
            assert ckpt[key].shape == tuple(entry.size), key
            assert ckpt[key].dtype == str(entry.properties.dtype).removeprefix("torch."), key


def test_dcp_tensor_data_reads_back_equal(dcp_dir: Path, mlp: nn.Module) -> None:
    ckpt = ws.open(dcp_dir)
    for key, value in mlp.state_dict().items():
        assert torch.equal(ckpt.tensor(key), value)
    assert torch.equal(ckpt.tensor("steps"), torch.arange(6, dtype=torch.int64).reshape(2, 3))


def test_random_metadata_is_corrupt(dcp_dir: Path) -> None:
    rng = random.Random(0)
    for _ in range(20):
        (dcp_dir / ".metadata").write_bytes(rng.randbytes(rng.randint(1, 400)))
        with pytest.raises(CorruptCheckpointError, match=r"\.metadata"):
            ws.open(dcp_dir)


def test_truncated_metadata_is_corrupt(dcp_dir: Path) -> None:
    data = (dcp_dir / ".metadata").read_bytes()
    for n in reversed(range(len(data))):
        os.truncate(dcp_dir / ".metadata", n)
        with pytest.raises(CorruptCheckpointError):
            ws.open(dcp_dir)
    (dcp_dir / ".metadata").write_bytes(data)
    assert "0.weight" in ws.open(dcp_dir)


def test_metadata_of_another_type_is_corrupt(dcp_dir: Path) -> None:
    (dcp_dir / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    with pytest.raises(CorruptCheckpointError, match="Metadata"):
        ws.open(dcp_dir)


def test_metadata_that_calls_os_system_is_refused(dcp_dir: Path) -> None:
    marker = dcp_dir.parent / "pwned"
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(RunsShell(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system") as err:
        ws.open(dcp_dir)
    assert str(dcp_dir / ".metadata") in str(err.value)
    assert not marker.exists()
    pickle.loads((dcp_dir / ".metadata").read_bytes())  # the payload is live: the check above can fail
    assert marker.exists()


def test_data_file_outside_the_folder_is_refused(dcp_dir: Path) -> None:
    import dataclasses

    meta = pickle.loads((dcp_dir / ".metadata").read_bytes())  # our own file, written above
    meta.storage_data = {index: dataclasses.replace(info, relative_path="../../etc/passwd")
                         for index, info in meta.storage_data.items()}
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(CorruptCheckpointError, match="leads out"):
        ws.open(dcp_dir)


def test_map_chunk_gives_the_region_without_private_memory(tmp_path: Path) -> None:
    from weightsmith.io.dcp import map_chunk

    value = torch.arange(6 * 5, dtype=torch.float32).reshape(6, 5)
    dcp_save({"w": value}, tmp_path / "dcp")
    reader = ws.open(tmp_path / "dcp").reader
    (chunk,) = reader.layout["w"]
    region, chunk_reader = map_chunk(tmp_path / "dcp", "w", chunk, "float32", (2, 3), start=(3, 1))
    assert torch.equal(region, value[3:5, 1:4])
    with pytest.raises(ws.CheckpointError, match=r"outside its stored chunk of \[6, 5\]"):
        map_chunk(tmp_path / "dcp", "w", chunk, "float32", (4, 5), start=(3, 0))
    chunk_reader.release("")
    assert torch.equal(region, value[3:5, 1:4])  # released pages are read again from the file


def test_a_chunk_cut_short_after_mapping_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """Touching a map past its file's end kills the process (SIGBUS); populating first raises instead."""
    from weightsmith.io.dcp import map_chunk

    dcp_save({"w": torch.randn(64, 1024)}, tmp_path / "dcp")  # 256 KiB: many pages
    reader = ws.open(tmp_path / "dcp").reader
    (chunk,) = reader.layout["w"]
    from weightsmith.io.dcp import open_chunk

    from weightsmith.io._base import read_in

    chunk_reader = open_chunk(tmp_path / "dcp", "w", chunk, "float32")
    mapped = chunk_reader.tensor("")  # mapped while whole
    os.truncate(tmp_path / "dcp" / chunk.file, chunk.byte_offset + chunk.length // 2)
    with pytest.raises(CorruptCheckpointError, match=r"__0_0\.distcp: .* bytes of data cannot be read"):
        read_in(mapped, chunk_reader.path)
    with pytest.raises(CorruptCheckpointError, match=r"'w' is stored at bytes .*truncated"):
        map_chunk(tmp_path / "dcp", "w", chunk, "float32", (64, 1024))
