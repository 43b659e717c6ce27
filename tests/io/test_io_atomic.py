"""Crash-safe saves: a failed save leaves the previous file bit-identical and no temporary files."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import weightsmith as ws
import weightsmith.io.atomic as atomic
from weightsmith.errors import SaveError


def enospc(*_args: object, **_kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every entry in a folder (hidden ones included) with its bytes."""
    return {p.name: p.read_bytes() if p.is_file() else b"<dir>" for p in folder.iterdir()}


def other_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


@pytest.mark.parametrize("fails", ["fsync", "replace"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_failed_save_keeps_the_previous_file(tmp_path: Path, mlp: nn.Module, monkeypatch: pytest.MonkeyPatch,
                                             fails: str, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    ws.save(mlp, path)
    before = folder_bytes(tmp_path)
    assert list(before) == [path.name]

    monkeypatch.setattr(atomic.os, fails, enospc)
    with pytest.raises(SaveError, match="No space left") as err:
        ws.save(other_model(), path)
    assert str(path) in str(err.value)
    assert isinstance(err.value.__cause__, OSError)
    monkeypatch.undo()

    assert folder_bytes(tmp_path) == before  # same file, same bytes, no temp file left
    assert torch.equal(ws.open(path).load()["0.weight"], mlp[0].weight)
    ws.save(other_model(), path)  # and the path still takes a good save
    assert torch.equal(ws.open(path).load()["0.weight"], other_model()[0].weight)


def test_failed_first_save_leaves_nothing(tmp_path: Path, mlp: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic.os, "fsync", enospc)
    with pytest.raises(SaveError):
        ws.save(mlp, tmp_path / "new.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_save_keeps_the_previous_file(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "model.safetensors"
    ws.save(mlp, path)
    before = folder_bytes(tmp_path)

    def interrupt(done: int, total: int, key: str) -> None:
        if done < total:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ws.save(other_model(), path, progress=interrupt)
    assert folder_bytes(tmp_path) == before


def test_unsaveable_tensor_keeps_the_previous_file(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "model.safetensors"
    ws.save(mlp, path)
    before = folder_bytes(tmp_path)
    with pytest.raises(SaveError, match="on the meta device"):
        ws.save({"a": torch.ones(3), "b": torch.empty(3, device="meta")}, path)
    assert folder_bytes(tmp_path) == before


def test_failed_sharded_save_keeps_the_previous_folder(tmp_path: Path, mlp: nn.Module,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "sharded"
    ws.save(mlp, folder, max_shard_size=40)
    before = folder_bytes(folder)
    monkeypatch.setattr(atomic.os, "fsync", enospc)
    with pytest.raises(SaveError, match="No space left"):
        ws.save(other_model(), folder, max_shard_size=100)
    monkeypatch.undo()
    assert folder_bytes(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["sharded"]  # no staging folder left behind
    assert torch.equal(ws.open(folder).load()["2.weight"], mlp[2].weight)


def test_sharded_overwrite_leaves_no_stale_shards(tmp_path: Path, mlp: nn.Module) -> None:
    folder = tmp_path / "sharded"
    ws.save(mlp, folder, max_shard_size=40)
    assert len(list(folder.glob("*.safetensors"))) == 3
    ws.save(other_model(), folder, max_shard_size="1MB")
    assert sorted(p.name for p in folder.iterdir()) == ["model-00001-of-00001.safetensors",
                                                        "model.safetensors.index.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["sharded"]
    assert torch.equal(ws.open(folder).load()["0.weight"], other_model()[0].weight)


def test_sharded_save_over_a_file_is_refused(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "taken"
    path.write_bytes(b"keep me")
    with pytest.raises(SaveError, match="not a folder"):
        ws.save(mlp, path, max_shard_size=40)
    assert path.read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_save_into_a_missing_folder(tmp_path: Path, mlp: nn.Module) -> None:
    with pytest.raises(SaveError, match="does not exist"):
        ws.save(mlp, tmp_path / "nope" / "model.safetensors")


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path: Path, mlp: nn.Module) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = tmp_path / "model.safetensors"
        dead_file = tmp_path / f".model.safetensors.tmp-{dead.pid}-0123456789ab"
        dead_dir = tmp_path / f".model.safetensors.tmp-{dead.pid}-ba9876543210"
        live_file = tmp_path / f".model.safetensors.tmp-{live.pid}-0123456789ab"
        unrelated = tmp_path / f".other.safetensors.tmp-{dead.pid}-0123456789ab"
        for p in (dead_file, live_file, unrelated):
            p.write_bytes(b"partial")
        dead_dir.mkdir()
        (dead_dir / "shard.safetensors").write_bytes(b"partial")

        ws.save(mlp, path)

        assert not dead_file.exists() and not dead_dir.exists()
        assert live_file.read_bytes() == b"partial"  # a running writer's file is never touched
        assert unrelated.exists()  # another path's temp files are that path's business
        assert torch.equal(ws.open(path).load()["0.bias"], mlp[0].bias)
    finally:
        live.kill()
        live.wait()


def test_clean_stale_reports_what_it_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "x.safetensors"
    mine = tmp_path / f".x.safetensors.tmp-{os.getpid()}-aaaa"
    theirs = tmp_path / f".x.safetensors.tmp-{dead.pid}-bbbb"
    junk = tmp_path / ".x.safetensors.tmp-notapid-cccc"
    for p in (mine, theirs, junk):
        p.write_bytes(b"")
    assert atomic.clean_stale(path) == [theirs]
    assert mine.exists() and junk.exists()


def test_the_version_being_replaced_leaves_the_page_cache_first(tmp_path: Path, monkeypatch) -> None:
    """Its pages are evicted before the new version is written beside it; its bytes are untouched."""
    evicted: list[list[str]] = []
    real = atomic.evict

    def spy(files):
        files = list(files)
        evicted.append(sorted(Path(f).name for f in files))
        real(files)

    monkeypatch.setattr(atomic, "evict", spy)
    state = {"w": torch.arange(12.0).reshape(3, 4)}
    ws.save(state, tmp_path / "m.safetensors")
    ws.save(state, tmp_path / "sharded", max_shard_size=16)
    assert evicted == []  # nothing to replace yet
    before = (tmp_path / "m.safetensors").read_bytes()
    ws.save({"w": torch.zeros(3, 4)}, tmp_path / "m.safetensors")
    ws.save(state, tmp_path / "sharded", max_shard_size=16)
    assert evicted[0] == ["m.safetensors"]
    assert evicted[1] == sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert before != (tmp_path / "m.safetensors").read_bytes()
    assert torch.equal(ws.open(tmp_path / "sharded").tensor("w"), state["w"])


def test_atomic_folder_carries_kept_entries_as_links(tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.mkdir()
    (path / "old.bin").write_bytes(b"old")
    (path / "config.json").write_text("{}")
    (path / "sub").mkdir()
    (path / "sub" / "deep.txt").write_text("deep")
    (path / "link").symlink_to("config.json")
    inode = (path / "config.json").stat().st_ino
    with atomic.atomic_folder(path, keep=lambda name: name != "old.bin") as stage:
        (stage / "new.bin").write_bytes(b"new")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "link", "new.bin", "sub"]
    assert (path / "config.json").stat().st_ino == inode and (path / "sub" / "deep.txt").read_text() == "deep"
    assert (path / "link").is_symlink() and (path / "link").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_atomic_folder_copies_where_links_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text("{}")
    stamp = (path / "config.json").stat().st_mtime_ns
    monkeypatch.setattr(atomic.os, "link", enospc)
    with atomic.atomic_folder(path, keep=lambda name: True) as stage:
        (stage / "new.bin").write_bytes(b"new")
    monkeypatch.undo()
    assert (path / "config.json").read_text() == "{}" and (path / "config.json").stat().st_mtime_ns == stamp
