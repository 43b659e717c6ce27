"""Crashes and failures during `weightsmith.save`: the path always holds one complete checkpoint.

Killed writers (SIGKILL at random moments, and once from inside the write), two writers racing
on one path, and injected faults (disk full while writing, EIO from fsync, rename, the folder
sync) for single files, torch files and sharded folders. The loops live in ``fuzz/kill_saves.py``;
this runs them small.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import random
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import weightsmith
from weightsmith.errors import SaveError
from weightsmith.io import atomic
from weightsmith.trust import verify


def _load_script() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "fuzz" / "kill_saves.py"
    spec = importlib.util.spec_from_file_location("kill_saves", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kill_saves"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


ks = _load_script()


@pytest.fixture(scope="module")
def versions() -> list[dict[str, Any]]:
    return ks.make_versions(4)


def test_a_writer_killed_at_random_moments_leaves_a_complete_version(tmp_path: Path,
                                                                    versions: list[dict[str, Any]]) -> None:
    path = tmp_path / "model.safetensors"
    stats = ks.kill_rounds(path, versions, kills=5, rng=random.Random(0))
    assert stats.failures == []
    assert stats.kills == 5 and sum(stats.versions.values()) == 5
    assert stats.cleaned == stats.mid_write
    assert ks.temp_files(path) == []


def test_a_writer_killed_inside_its_write_leaves_the_old_file_and_a_temp_the_next_save_removes(
        tmp_path: Path, versions: list[dict[str, Any]]) -> None:
    path = tmp_path / "model.safetensors"
    weightsmith.save(versions[0], path)
    before = path.read_bytes()

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child dies half-way through its data
        def die(done: int, total: int, _key: str) -> None:
            if done * 2 >= total:
                os.kill(os.getpid(), signal.SIGKILL)

        try:
            weightsmith.save(versions[1], path, progress=die)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    left = ks.temp_files(path, pid)
    assert len(left) == 1  # the half-written temporary file (its data may not have left the writer's blocks)
    assert path.read_bytes() == before
    assert ks.check_complete(path, versions) == 0

    weightsmith.save(versions[1], path)  # a later save, by a live process, removes it
    assert ks.temp_files(path) == []
    assert ks.check_complete(path, versions) == 1


def test_two_writers_saving_to_one_path_never_leave_a_mixture(tmp_path: Path,
                                                              versions: list[dict[str, Any]]) -> None:
    stats = ks.race(tmp_path / "model.safetensors", versions, snapshots=8, rng=random.Random(1))
    assert stats.failures == []
    assert sum(stats.snapshots.values()) == 8


def test_a_live_writers_temp_file_is_never_removed(tmp_path: Path, versions: list[dict[str, Any]]) -> None:
    path = tmp_path / "model.safetensors"
    live = path.parent / f".{path.name}.tmp-{os.getppid()}-0123456789ab"  # pid of a live process
    live.write_bytes(b"in progress")
    weightsmith.save(versions[0], path)
    assert live.read_bytes() == b"in progress"


# -- injected faults ----------------------------------------------------------------------------------
class _FullDisk:
    """A file whose writes fail with ENOSPC once ``budget`` bytes have gone through."""

    def __init__(self, f: Any, budget: int) -> None:
        self._f, self._budget = f, budget

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        if n > self._budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._budget -= n
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.__exit__(*exc)


def _fail(err: int) -> Any:
    def raise_(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(err, os.strerror(err))

    return raise_


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    return {path.name: path.read_bytes()}


def _leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.tmp-"))


def _inject(monkeypatch: pytest.MonkeyPatch, fault: str, fmt: str) -> None:
    if fault == "write ENOSPC":
        real_new_file = atomic.new_file

        def full_new_file(path: Path, **kwargs: Any) -> Any:
            return _FullDisk(real_new_file(path, **kwargs), 3000)

        # every file of a save (single files, shards) is opened through new_file
        monkeypatch.setattr(atomic, "new_file", full_new_file)
    elif fault == "fsync EIO":
        monkeypatch.setattr(atomic.os, "fsync", _fail(errno.EIO))
    elif fault == "rename EIO":
        monkeypatch.setattr(atomic.os, "replace", _fail(errno.EIO))
        monkeypatch.setattr(atomic.os, "rename", _fail(errno.EIO))
        monkeypatch.setattr(atomic, "_exchange", _fail(errno.EIO))


@pytest.mark.parametrize("fmt", ["safetensors", "torch", "sharded"])
@pytest.mark.parametrize("fault", ["write ENOSPC", "fsync EIO", "rename EIO"])
def test_a_failed_save_keeps_the_old_checkpoint_bit_for_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            versions: list[dict[str, Any]], fmt: str,
                                                            fault: str) -> None:
    path = tmp_path / {"safetensors": "m.safetensors", "torch": "m.pt", "sharded": "m"}[fmt]
    options = {"max_shard_size": "5MB"} if fmt == "sharded" else {}
    weightsmith.save(versions[0], path, **options)
    before = _snapshot(path)

    _inject(monkeypatch, fault, fmt)
    with pytest.raises(SaveError, match="intact") as err:
        weightsmith.save(versions[1], path, **options)
    monkeypatch.undo()

    assert isinstance(err.value.__cause__, (OSError, RuntimeError))
    assert _snapshot(path) == before
    assert _leftovers(path) == []
    loaded = weightsmith.open(path).load()
    assert torch.equal(loaded["layer0.weight"], versions[0]["layer0.weight"])


def test_a_failed_folder_sync_after_the_rename_says_the_new_file_is_in_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, versions: list[dict[str, Any]]) -> None:
    path = tmp_path / "m.safetensors"
    weightsmith.save(versions[0], path)
    monkeypatch.setattr(atomic, "fsync_dir", _fail(errno.EIO))

    with pytest.raises(SaveError, match="new file is in place"):
        weightsmith.save(versions[1], path)
    monkeypatch.undo()

    assert _leftovers(path) == []
    assert ks.check_complete(path, versions) == 1
    assert verify(path).ok
