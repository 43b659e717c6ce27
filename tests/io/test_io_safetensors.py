"""safetensors: exact round trips, interoperability with the reference library, and every header rule."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

import weightsmith as ws
from weightsmith.errors import CorruptCheckpointError, WeightsmithError
from weightsmith.io.safetensors import CHECKSUMS_KEY, MAX_HEADER


def raw_file(path: Path, header: object, data: bytes = b"", *, text: bytes | None = None,
             declared: int | None = None) -> Path:
    """Write a safetensors file byte by byte: length prefix, header JSON (or raw ``text``), data."""
    body = text if text is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if declared is None else declared) + body + data)
    return path


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so float8 and NaN compare exactly."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def every_dtype() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(3, 5)
    return {
        "f32": x,
        "f16": x.half(),
        "bf16": x.bfloat16(),
        "i64": torch.arange(-7, 8, dtype=torch.int64).reshape(3, 5),
        "bool": x > 0,
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "f8": x.to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "empty_i64": torch.zeros(4, 0, dtype=torch.int64),
    }


# round trips ----------------------------------------------------------------------------------

def test_every_dtype_reads_like_the_reference_loader(tmp_path: Path) -> None:
    path = tmp_path / "all.safetensors"
    sd = every_dtype()
    safetensors.torch.save_file(sd, path)
    reference = safetensors.torch.load_file(path)

    ckpt = ws.open(path)
    assert ckpt.format == "safetensors"
    assert set(ckpt) == set(sd)
    loaded = ckpt.load()
    for key, t in sd.items():
        assert ckpt[key].shape == tuple(t.shape), key
        assert ckpt[key].dtype == str(t.dtype).removeprefix("torch."), key
        assert ckpt[key].nbytes == t.numel() * t.element_size(), key
        assert loaded[key].dtype == t.dtype and loaded[key].shape == t.shape, key
        assert torch.equal(bits(loaded[key]), bits(reference[key])), key
        assert torch.equal(bits(loaded[key]), bits(t)), key
    assert loaded["scalar"].dim() == 0 and loaded["scalar"].item() == 2.5
    assert ckpt.num_params == sum(t.numel() for t in sd.values())


def test_save_output_is_read_by_the_reference_loader(tmp_path: Path) -> None:
    path = tmp_path / "ws.safetensors"
    sd = every_dtype()
    report = ws.save(sd, path, metadata={"note": "hello"})
    assert report.format == "safetensors" and report.tensors == len(sd)

    reference = safetensors.torch.load_file(path)
    assert set(reference) == set(sd)
    for key, t in sd.items():
        assert reference[key].dtype == t.dtype and reference[key].shape == t.shape, key
        assert torch.equal(bits(reference[key]), bits(t)), key
    with safetensors.safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["note"] == "hello"
    crcs = json.loads(meta[CHECKSUMS_KEY])
    assert set(crcs) == set(sd) and all(len(v) == 8 and v != "00000000" for k, v in crcs.items()
                                        if sd[k].numel())
    assert ws.open(path).metadata["note"] == "hello"


def test_noncontiguous_and_model_tensors_round_trip(tmp_path: Path, mlp: torch.nn.Module) -> None:
    path = tmp_path / "mlp.safetensors"
    sd = {**mlp.state_dict(), "t": torch.arange(12.0).reshape(3, 4).t()}
    ws.save(sd, path)
    loaded = ws.open(path).load()
    assert set(loaded) == set(sd)
    for key, t in sd.items():
        assert torch.equal(loaded[key], t), key


def test_loaded_tensors_are_copy_on_write(tmp_path: Path, mlp: torch.nn.Module) -> None:
    path = tmp_path / "mlp.safetensors"
    ws.save(mlp, path)
    before = path.read_bytes()
    t = ws.open(path).load()["0.weight"]
    t.add_(1.0)
    assert path.read_bytes() == before
    assert torch.equal(ws.open(path).load()["0.weight"], mlp.state_dict()["0.weight"])


def test_tied_model_keeps_its_ties(tmp_path: Path, tied_mlp: torch.nn.Module) -> None:
    path = tmp_path / "tied.safetensors"
    report = ws.save(tied_mlp, path)
    assert report.ties == {"3.weight": "1.weight", "3.bias": "1.bias"}
    # stored once: the reference loader sees only the stored keys
    assert set(safetensors.torch.load_file(path)) == {"0.weight", "0.bias", "1.weight", "1.bias",
                                                       "4.weight", "4.bias"}
    ckpt = ws.open(path)
    assert sorted(ckpt.ties) == [("1.bias", "3.bias"), ("1.weight", "3.weight")]
    assert ckpt.num_params == 40 + 72 + 9
    loaded = ckpt.load()
    assert loaded["1.weight"] is loaded["3.weight"]
    assert torch.equal(loaded["3.weight"], tied_mlp[1].weight)


# header rules: each broken rule is a CorruptCheckpointError naming the file -------------------

F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

BROKEN: dict[str, dict[str, object]] = {}  # name -> raw_file arguments breaking one rule


def _case(name: str, **kw: object) -> None:
    BROKEN[name] = kw


_case("header_over_limit", header={}, declared=MAX_HEADER + 1, data=b"{}" + b" " * 64)
_case("header_longer_than_file", header={"a": F32_2}, declared=10_000, data=b"\0" * 8)
_case("invalid_utf8", text=b'{"\xff\xfe": 1}')
_case("invalid_json", text=b'{"a": {"dtype": "F32",')
_case("non_object_header", header=[1, 2, 3])
_case("string_header", header="hello")
_case("metadata_non_string_value", header={"__metadata__": {"epoch": 3}, "a": F32_2}, data=b"\0" * 8)
_case("metadata_not_object", header={"__metadata__": ["x"], "a": F32_2}, data=b"\0" * 8)
_case("unknown_dtype", header={"a": {"dtype": "F17", "shape": [2], "data_offsets": [0, 8]}}, data=b"\0" * 8)
_case("dtype_not_string", header={"a": {"dtype": 4, "shape": [2], "data_offsets": [0, 8]}}, data=b"\0" * 8)
_case("negative_shape", header={"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, data=b"\0" * 8)
_case("float_shape", header={"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, data=b"\0" * 8)
_case("bool_shape", header={"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, data=b"\0" * 8)
_case("shape_not_list", header={"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, data=b"\0" * 8)
_case("offsets_too_small", header={"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, data=b"\0" * 4)
_case("offsets_too_large", header={"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}},
      data=b"\0" * 12)
_case("offsets_reversed", header={"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, data=b"\0" * 8)
_case("offsets_three_numbers", header={"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}},
      data=b"\0" * 8)
_case("offsets_negative", header={"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}},
      data=b"\0" * 8)
_case("missing_field", header={"a": {"dtype": "F32", "shape": [2]}}, data=b"\0" * 8)
_case("extra_field", header={"a": {**F32_2, "extra": 1}}, data=b"\0" * 8)
_case("entry_not_object", header={"a": [1, 2]}, data=b"\0" * 8)
_case("gap", header={"a": F32_2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}},
      data=b"\0" * 20)
_case("gap_at_start", header={"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, data=b"\0" * 12)
_case("overlap", header={"a": F32_2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
      data=b"\0" * 12)
_case("trailing_bytes", header={"a": F32_2}, data=b"\0" * 9)
_case("data_truncated", header={"a": F32_2}, data=b"\0" * 7)
_case("duplicate_keys", text=b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                             b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', data=b"\0" * 8)
_case("huge_shape", header={"a": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 8]}},
      data=b"\0" * 8)
_case("huge_shape_declared", header={"a": {"dtype": "U8", "shape": [1 << 50], "data_offsets": [0, 1 << 50]}},
      data=b"\0" * 8)
_case("shape_overflows", header={"a": {"dtype": "F32", "shape": [10**30], "data_offsets": [0, 8]}},
      data=b"\0" * 8)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_broken_header_rule_is_a_corrupt_checkpoint_error(tmp_path: Path, name: str) -> None:
    kw = dict(BROKEN[name])
    path = raw_file(tmp_path / f"{name}.safetensors", kw.pop("header", None), kw.pop("data", b""),
                    text=kw.pop("text", None), declared=kw.pop("declared", None))
    with pytest.raises(CorruptCheckpointError) as err:
        ws.open(path)
    assert str(path) in str(err.value)


def test_a_valid_handmade_file_passes_the_same_checks(tmp_path: Path) -> None:
    """The fixtures above are broken only where they mean to be: fixing the rule makes them open."""
    header = {"__metadata__": {"epoch": "3"}, "a": F32_2,
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    data = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    path = raw_file(tmp_path / "ok.safetensors", header, data)
    ckpt = ws.open(path)
    assert ckpt.metadata == {"epoch": "3"}
    loaded = ckpt.load()
    assert loaded["a"].tolist() == [1.0, 2.0] and loaded["b"].tolist() == [3.0, 4.0]
    assert torch.equal(loaded["b"], safetensors.torch.load_file(path)["b"])


def test_the_error_names_the_rule(tmp_path: Path) -> None:
    gap = raw_file(tmp_path / "gap.safetensors", BROKEN["gap"]["header"], BROKEN["gap"]["data"])
    with pytest.raises(CorruptCheckpointError, match="gap of 4 bytes"):
        ws.open(gap)
    dup = raw_file(tmp_path / "dup.safetensors", None, BROKEN["duplicate_keys"]["data"],
                   text=BROKEN["duplicate_keys"]["text"])
    with pytest.raises(CorruptCheckpointError, match="duplicate key 'a'"):
        ws.open(dup)
    big = raw_file(tmp_path / "big.safetensors", {}, b"{}", declared=MAX_HEADER + 1)
    with pytest.raises(CorruptCheckpointError, match="100,000,000"):
        ws.open(big)


def test_huge_declared_shape_allocates_nothing(tmp_path: Path) -> None:
    import tracemalloc

    path = raw_file(tmp_path / "huge.safetensors",
                    {"a": {"dtype": "F64", "shape": [1 << 30, 1 << 20], "data_offsets": [0, 1 << 53]}},
                    b"\0" * 16)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError, match="truncated"):
            ws.open(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000


def test_every_truncation_of_a_real_file_is_a_weightsmith_error(tmp_path: Path,
                                                                 mlp: torch.nn.Module) -> None:
    full = tmp_path / "full.safetensors"
    safetensors.torch.save_file(mlp.state_dict(), full)
    data = full.read_bytes()
    assert len(data) < 2_000
    cut = tmp_path / "cut.safetensors"
    cut_nosuffix = tmp_path / "cut.bin"
    cut.write_bytes(data)
    cut_nosuffix.write_bytes(data)
    for n in reversed(range(len(data))):  # shortening in place is far cheaper than rewriting
        os.truncate(cut, n)
        with pytest.raises(CorruptCheckpointError) as err:
            ws.open(cut)
        assert str(cut) in str(err.value), n
        os.truncate(cut_nosuffix, n)
        with pytest.raises(WeightsmithError):
            ws.open(cut_nosuffix)
    cut.write_bytes(data)
    assert torch.equal(ws.open(cut).load()["2.bias"], mlp[2].bias)


def test_read_in_reads_a_slice_now_and_a_file_cut_short_raises(tmp_path: Path) -> None:
    from weightsmith.io._base import read_in

    path = tmp_path / "m.safetensors"
    ws.save({"a": torch.randn(64, 1024), "b": torch.randn(64, 1024)}, path)
    reader = ws.open(path).reader
    a, b = reader.tensor("a"), reader.tensor("b")
    read_in(a[10:20], path)
    assert torch.equal(a, safetensors.torch.load_file(path)["a"])
    os.truncate(path, os.path.getsize(path) - 64 * 1024 * 2)  # rows 32.. of "b" gone, "a" whole
    read_in(a, path)
    read_in(b[:16], path)  # the rows still there
    with pytest.raises(CorruptCheckpointError, match=r"m\.safetensors: .* bytes of data cannot be read"):
        read_in(b[40:], path)
