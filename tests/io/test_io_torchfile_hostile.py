"""Torch archives built to be read two ways or to break the reader: each is a WeightsmithError naming the file.

Two ``archive/data.pkl`` members (torch reads the first, Python's zipfile the last), records
under two prefixes, ``BUILD`` opcodes that rewrite a tensor record after it was rebuilt, and a
meta tensor with more elements than torch can count.
"""

from __future__ import annotations

import io
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import weightsmith
from weightsmith.cli import cli
from weightsmith.errors import CorruptCheckpointError, WeightsmithError
from weightsmith.trust import scan_globals


def _members(obj: object) -> list[tuple[str, bytes]]:
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def _zip(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicate name
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for name, data in members:
                zf.writestr(name, data)
    return path


def _with_data_pkl(tmp_path: Path, body: bytes, name: str = "m.pt") -> Path:
    members = [(n, body if n.endswith("/data.pkl") else d) for n, d in _members({"w": torch.arange(6.0)})]
    return _zip(tmp_path / name, members)


def _assert_refused_everywhere(path: Path, match: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=match) as err:
        weightsmith.open(path)
    assert str(path) in str(err.value)
    with pytest.raises(CorruptCheckpointError, match=match):
        scan_globals(path)
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code == 2 and path.name in result.output, result.output


def test_two_data_pkl_members_are_refused_not_read_one_way(tmp_path: Path) -> None:
    first = _members({"w": torch.ones(3)})
    second = [m for m in _members({"w": torch.zeros(3)}) if m[0].endswith("/data.pkl")]
    path = _zip(tmp_path / "twice.pt", first + second)
    # the differential: torch reads the first data.pkl, zipfile's by-name lookup the last
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    with zipfile.ZipFile(path) as zf:
        assert zf.read(second[0][0]) == second[0][1]

    _assert_refused_everywhere(path, "two members named")


def test_records_under_two_prefixes_are_refused(tmp_path: Path) -> None:
    members = _members({"w": torch.ones(3)})
    other = [(n.replace(n.partition("/")[0], "other", 1), d) for n, d in _members({"w": torch.zeros(3)})]
    path = _zip(tmp_path / "two-prefixes.pt", other + members)

    _assert_refused_everywhere(path, "2 prefixes")


def test_a_plain_torch_file_is_not_affected(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.arange(6.0)}, path)
    assert torch.equal(weightsmith.open(path).load()["w"], torch.arange(6.0))
    assert CliRunner().invoke(cli, ["check", str(path)]).exit_code == 0


# -- BUILD after validation, and impossible sizes -----------------------------------------------------
def _s(text: str) -> bytes:
    return b"X" + struct.pack("<I", len(text)) + text.encode()


_STORAGE = b"(" + _s("storage") + b"ctorch\nFloatStorage\n" + _s("0") + _s("cpu") + b"K\x06tQ"
_TENSOR = (b"ctorch._utils\n_rebuild_tensor_v2\n(" + _STORAGE + b"K\x00(K\x06t(K\x01t\x89"
           b"ccollections\nOrderedDict\n)RtR")


@pytest.mark.parametrize("state", [
    b"}" + _s("shape") + _s("not a shape") + b"s",   # TypeError before
    b"}" + _s("storage") + b"Ns",                    # KeyError/AttributeError before
    b"N}" + _s("stride") + b"(K\x00t" + b"s\x86",   # (None, slotstate)
], ids=["shape", "storage", "slotstate"])
def test_build_that_rewrites_a_tensor_record_is_a_corrupt_checkpoint(tmp_path: Path, state: bytes) -> None:
    body = b"\x80\x02}" + _s("w") + _TENSOR + state + b"bs."
    path = _with_data_pkl(tmp_path, body)
    with pytest.raises(CorruptCheckpointError, match="sets state on a tensor") as err:
        weightsmith.open(path).load()
    assert str(path) in str(err.value)


def test_a_meta_tensor_larger_than_torch_can_count_is_a_corrupt_checkpoint(tmp_path: Path) -> None:
    big = b"J\x00\x00\x00\x40"  # 2**30
    body = (b"\x80\x02}" + _s("w") + b"ctorch._utils\n_rebuild_meta_tensor_no_storage\n(ctorch\nfloat32\n"
            + b"(" + big * 3 + b"t(" + b"\x8a\x08" + struct.pack("<q", 1 << 60) + b"\x8a\x08"
            + struct.pack("<q", 1 << 30) + b"K\x01t\x89tRs.")
    path = _with_data_pkl(tmp_path, body)
    with pytest.raises(WeightsmithError, match="more than torch can") as err:
        ck = weightsmith.open(path)
        ck.tensor("w")
    assert str(path) in str(err.value)


@pytest.mark.parametrize("flag", [_s("yes"), b"ccollections\nOrderedDict\n)R"], ids=["text", "object"])
def test_requires_grad_that_is_no_bool_is_a_corrupt_checkpoint(tmp_path: Path, flag: bytes) -> None:
    # torch's C setter takes a bool and nothing else; anything here is a doctored record
    tensor = _TENSOR.replace(b"\x89ccollections", flag + b"ccollections", 1)
    path = _with_data_pkl(tmp_path, b"\x80\x02}" + _s("w") + tensor + b"s.")
    with pytest.raises(CorruptCheckpointError, match="requires_grad"):
        weightsmith.open(path)


def test_an_allowlisted_rebuild_given_the_wrong_arguments_is_a_corrupt_checkpoint(tmp_path: Path) -> None:
    # found by the fuzzer: _rebuild_tensor takes four arguments; seven raised a bare TypeError
    tensor = _TENSOR.replace(b"_rebuild_tensor_v2", b"_rebuild_tensor", 1)
    path = _with_data_pkl(tmp_path, b"\x80\x02}" + _s("w") + tensor + b"s.")
    with pytest.raises(CorruptCheckpointError) as err:
        weightsmith.open(path)
    assert str(path) in str(err.value)
