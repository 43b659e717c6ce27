"""Damaged files: every reader either succeeds or raises a WeightsmithError, fast and small.

A short run of the fuzzer in ``fuzz/fuzz_formats.py`` (a few hundred cases, fixed seed), then
one test per defect the long runs found, each on a file written to show it.
"""

from __future__ import annotations

import importlib.util
import io
import json
import resource
import signal
import struct
import sys
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings

import weightsmith
from weightsmith.errors import CheckpointError, CorruptCheckpointError
from weightsmith.trust import scan_globals, verify


def _load_fuzzer() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "fuzz" / "fuzz_formats.py"
    spec = importlib.util.spec_from_file_location("fuzz_formats", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_formats"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


ff = _load_fuzzer()


@pytest.fixture
def deadline() -> Iterator[None]:
    """Fail a test that hangs instead of hanging the suite."""

    def _raise(_signum: int, _frame: object) -> None:
        raise TimeoutError("the reader hung")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def worker() -> Iterator[object]:
    """One child process for every case: a crash or a hang is counted, not fatal to the suite."""
    w = ff.Worker()
    yield w
    w.close()


def test_damaged_files_open_or_raise_weightsmith_errors(worker: object) -> None:
    ff.bases()
    outcomes: Counter[str] = Counter()
    bad: list[str] = []
    peaks: list[tuple[float, int]] = []

    @settings(max_examples=300, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=ff.cases())
    def check(case: object) -> None:
        outcome = worker.run(case)  # type: ignore[attr-defined]
        outcomes[outcome.kind] += 1
        peaks.append((outcome.peak_mib, len(case.data)))  # type: ignore[attr-defined]
        if outcome.kind not in ("ok", "error"):
            bad.append(f"{outcome.kind}: {outcome.detail}")

    check()
    assert not bad, "\n".join(bad[:10])
    assert sum(outcomes.values()) == 300
    # both outcomes occur: the cases are neither all harmless nor all rejected at the first byte
    assert outcomes["ok"] >= 10 and outcomes["error"] >= 100, outcomes
    # the worker caps each case's address space; its resident memory stays inside the same bound
    over = [(mib, size) for mib, size in peaks if mib * 2**20 > ff.memory_limit(size)]
    assert not over, f"{len(over)} case(s) above 2x the file + 256 MiB, e.g. {over[0]}"


def test_the_worker_counts_a_crash_and_goes_on(worker: object) -> None:
    """A case that kills its process (as SIGBUS would) is reported as a crash, and the next one runs."""
    whole = ff.Case(".pt", ff.bases()["torch"], "whole")
    assert worker.run(whole).kind == "ok"  # type: ignore[attr-defined]
    worker._proc.kill()  # type: ignore[attr-defined]  # dies as a case would make it die
    crashed = worker.run(whole)  # type: ignore[attr-defined]
    assert (crashed.kind, crashed.detail.split(":")[0]) == ("crash", "signal 9 (SIGKILL)")
    assert worker.run(whole).kind == "ok"  # type: ignore[attr-defined]


# -- defects found by the long runs, one file each ---------------------------------------------------
def _zip(members: list[tuple[str, bytes]]) -> bytes:
    return ff._rezip([(n, d, zipfile.ZIP_STORED) for n, d in members])


def _tensor_pkl(stype: str = "FloatStorage", key: str = "0", numel: int = 4, shape: tuple[int, ...] = (4,),
                stride: tuple[int, ...] = (1,), extra: bytes = b"") -> bytes:
    pid = (b"(" + ff._p_str("storage") + b"ctorch\n" + stype.encode() + b"\n" + ff._p_str(key)
           + ff._p_str("cpu") + ff._long1(numel) + b"tQ")
    tensor = (b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + ff._long1(0) + ff._p_tuple(list(shape))
              + ff._p_tuple(list(stride)) + b"\x89ccollections\nOrderedDict\n)RtR")
    return b"\x80\x02}q\x00(" + ff._p_str("w") + tensor + extra + b"u."


def test_a_list_that_contains_itself_does_not_hang(tmp_path: Path, deadline: None) -> None:
    loop: list[object] = []
    loop.append(loop)
    path = tmp_path / "loop.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "loop": loop}, path)
    assert torch.equal(weightsmith.open(path).load()["w"], torch.ones(2))


def test_a_dict_shared_under_two_names_40_deep_does_not_unfold(tmp_path: Path, deadline: None) -> None:
    # the top dict holds a tensor and a tree of 2**40 paths over 41 dict objects
    tree = b"".join(b"}q" + bytes([2 + i]) + b"(" + ff._p_str("a") + b"h" + bytes([1 + i]) + ff._p_str("b")
                    + b"h" + bytes([1 + i]) + b"u" + (b"0" if i < 39 else b"") for i in range(40))
    extra = ff._p_str("tree") + b"}q\x01" + ff._p_str("w") + b"h\x00s0" + tree
    path = tmp_path / "tree.pt"
    path.write_bytes(_zip([("archive/data.pkl", _tensor_pkl(extra=extra)), ("archive/data/0", bytes(16))]))
    ckpt = weightsmith.open(path)
    assert list(ckpt) == ["w"]
    assert ckpt.load()["w"].shape == (4,)


def test_a_tensor_over_a_non_storage_is_corrupt_not_meta(tmp_path: Path) -> None:
    pkl = _tensor_pkl().replace(b"tQ", b"t")  # the persistent id tuple, never resolved to a storage
    path = tmp_path / "nostorage.pt"
    path.write_bytes(_zip([("archive/data.pkl", pkl), ("archive/data/0", bytes(16))]))
    with pytest.raises(CorruptCheckpointError, match="not a storage"):
        weightsmith.open(path)


@pytest.mark.parametrize(("stype", "why"), [("NoSuchStorage", "unsupported storage type"),
                                             ("QInt8Storage", "unsupported storage type")])
def test_unknown_and_quantized_storages_are_refused(tmp_path: Path, stype: str, why: str) -> None:
    path = tmp_path / "storage.pt"
    path.write_bytes(_zip([("archive/data.pkl", _tensor_pkl(stype=stype)), ("archive/data/0", bytes(16))]))
    with pytest.raises(CorruptCheckpointError, match=why):
        weightsmith.open(path)


@pytest.mark.parametrize("shape", [(2**63,), ("4",), (4.0,)])
def test_shapes_that_are_not_64_bit_integers_are_corrupt(tmp_path: Path, shape: tuple[object, ...]) -> None:
    pkl = _tensor_pkl()
    if isinstance(shape[0], int):
        pkl = pkl.replace(ff._p_tuple([4]), ff._p_tuple([shape[0]]))
    else:
        value = ff._p_str(shape[0]) if isinstance(shape[0], str) else b"G" + struct.pack(">d", shape[0])
        pkl = pkl.replace(ff._p_tuple([4]), b"(" + value + b"t")
    path = tmp_path / "shape.pt"
    path.write_bytes(_zip([("archive/data.pkl", pkl), ("archive/data/0", bytes(16))]))
    with pytest.raises(CorruptCheckpointError, match="shape"):
        weightsmith.open(path)


def test_one_storage_read_as_two_dtypes_is_corrupt(tmp_path: Path) -> None:
    # two tensors over storage "0": one as 3 bools (3 bytes), one as bfloat16 (2 bytes each)
    first = _tensor_pkl(stype="BoolStorage", numel=3, shape=(3,))
    second = ff._p_str("v") + _tensor_pkl(stype="BFloat16Storage", numel=1, shape=(1,))[len(b"\x80\x02}q\x00(")
                                                                                         + len(ff._p_str("w")):-2]
    pkl = first[:-2] + second + b"u."
    path = tmp_path / "twodtypes.pt"
    path.write_bytes(_zip([("archive/data.pkl", pkl), ("archive/data/0", bytes(3))]))
    with pytest.raises(CorruptCheckpointError, match="does not fit its storage"):
        weightsmith.open(path).load()


def test_a_zip_end_record_claiming_several_disks_is_corrupt(tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    data = bytearray(buf.getvalue())
    zip64_locator = data.rfind(b"PK\x06\x07")
    end = data.rfind(b"PK\x05\x06")
    if zip64_locator < 0:  # write one: the multi-disk check lives in the zip64 locator
        locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, 0, 2)
        data[end:end] = locator
    else:
        struct.pack_into("<I", data, zip64_locator + 16, 2)
    path = tmp_path / "disks.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="damaged zip"):
        weightsmith.open(path)
    with pytest.raises(CorruptCheckpointError):
        verify(path)
    with pytest.raises(CorruptCheckpointError):
        scan_globals(path)


def test_tie_metadata_naming_a_non_string_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "ties.safetensors"
    weightsmith.save({"a": torch.ones(2)}, path, metadata={"weightsmith.ties": json.dumps({"b": {"x": 1}})})
    with pytest.raises(CorruptCheckpointError, match="tie"):
        weightsmith.open(path)


def test_a_meta_tensor_in_a_file_loads_as_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "meta.pt"
    torch.save({"w": torch.ones(2), "m": torch.empty(3, device="meta")}, path)
    ckpt = weightsmith.open(path)
    assert ckpt["m"].shape == (3,)
    with pytest.raises(CheckpointError, match="'m' is stored without data"):
        ckpt.load()
    assert torch.equal(ckpt.load(["w"])["w"], torch.ones(2))


def test_a_class_stored_by_reference_is_not_walked_as_an_object(tmp_path: Path) -> None:
    import argparse

    path = tmp_path / "cls.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "model_class": argparse.Namespace}, path)
    ckpt = weightsmith.open(path)
    assert list(ckpt) == ["w"]
    assert torch.equal(ckpt.load()["w"], torch.ones(2))
    uses = {g.name: g for g in scan_globals(path).globals}["argparse.Namespace"]
    assert (uses.status, uses.uses) == ("data", ("imported",))


def test_the_fuzzer_compares_odd_views_by_their_bytes() -> None:
    # a 1-element view keeps any stride: viewing it as bytes must not fail (seen in a long run)
    odd = torch.arange(8, dtype=torch.int64).as_strided((1,), (31,))
    assert ff._bytes_of(odd) == (0).to_bytes(8, "little")
    assert ff._bytes_of(torch.tensor(1.5, dtype=torch.float64)) == struct.pack("<d", 1.5)
