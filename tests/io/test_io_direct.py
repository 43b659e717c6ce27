"""`DirectFile`: what is written past the page cache reads back byte for byte, whatever the
sizes, seeks and flushes; filesystems without direct writes get the same bytes."""

import errno
import io
import os
import random
from pathlib import Path

import pytest

from weightsmith.io import direct
from weightsmith.io.direct import BLOCK, DirectFile


def replay(path: Path, ops: list) -> bytes:
    """Run ``ops`` on a DirectFile at ``path`` and on a BytesIO; return what BytesIO holds."""
    ref = io.BytesIO()
    with DirectFile(path) as f:
        for op, arg in ops:
            if op == "write":
                assert f.write(arg) == len(arg)
                ref.write(arg)
            elif op == "seek":
                assert f.seek(arg) == ref.seek(arg)
            elif op == "end":
                assert f.seek(0, os.SEEK_END) == ref.seek(0, os.SEEK_END)
            else:  # flush: the file holds everything so far, at its exact size
                f.flush()
                assert path.read_bytes() == ref.getvalue()
            assert f.tell() == ref.tell()
    return ref.getvalue()


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + BLOCK // 2 + 7])
def test_one_write_of_any_size_reads_back(tmp_path, size):
    data = os.urandom(size)
    want = replay(tmp_path / "f", [("write", data)])
    assert (tmp_path / "f").read_bytes() == want == data


def test_many_writes_seeks_over_earlier_blocks_and_flushes(tmp_path):
    rng = random.Random(0)
    ops: list = [("write", b"H" * 64)]  # a header patched at the end, as the safetensors writer does
    size = 64
    for i in range(60):
        chunk = rng.randbytes(rng.choice([1, 7, 4096, 100_000, BLOCK // 3, BLOCK + 5]))
        ops.append(("write", chunk))
        size += len(chunk)
        if i % 17 == 0:
            ops.append(("flush", None))
        if i % 11 == 0:  # back over bytes already sent to disk, or still in the block being filled
            where = rng.choice([rng.randrange(0, size), max(0, size - 100)])
            ops += [("seek", where), ("write", rng.randbytes(300)), ("end", None)]
            size = max(size, where + 300)
    ops += [("seek", 8), ("write", b"patched header"), ("end", None)]
    want = replay(tmp_path / "f", ops)
    assert len(want) > 3 * BLOCK
    assert (tmp_path / "f").read_bytes() == want


def test_seeking_past_the_end_is_refused(tmp_path):
    with DirectFile(tmp_path / "f") as f:
        f.write(b"abc")
        with pytest.raises(OSError, match="cannot seek to 4"):
            f.seek(4)


def test_an_existing_file_is_never_opened(tmp_path):
    (tmp_path / "f").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        DirectFile(tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == b"keep"


def test_a_filesystem_refusing_direct_writes_at_open_gets_the_same_bytes(tmp_path, monkeypatch):
    real = os.open
    refused = []

    def open_(path, flags, mode=0o777):
        if flags & os.O_DIRECT:  # as older tmpfs and some network filesystems answer
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, mode)

    monkeypatch.setattr(direct.os, "open", open_)
    data = os.urandom(BLOCK + 12345)
    want = replay(tmp_path / "f", [("write", data), ("seek", 3), ("write", b"xyz"), ("end", None)])
    assert (tmp_path / "f").read_bytes() == want and refused


def test_direct_writes_refused_after_open_fall_back_to_the_page_cache(tmp_path, monkeypatch):
    real = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(direct.os, "pwrite", pwrite)
    data = os.urandom(2 * BLOCK + 99)
    assert replay(tmp_path / "f", [("write", data)]) == (tmp_path / "f").read_bytes() == data
    assert refused  # the direct path was tried first


def test_a_failed_write_surfaces_and_atomic_saves_keep_the_old_file(tmp_path, monkeypatch):
    import torch

    import weightsmith as ws

    target = tmp_path / "w.safetensors"
    ws.save({"w": torch.ones(3)}, target)
    before = target.read_bytes()

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct.os, "pwrite", full)
    with pytest.raises(ws.SaveError, match="No space left"):
        ws.save({"w": torch.zeros(4 * BLOCK // 4)}, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
