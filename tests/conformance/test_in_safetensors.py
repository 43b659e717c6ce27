"""In: files written by ``safetensors.torch.save_file``, one per dtype torch and safetensors share.

Each holds a 2-D tensor, a 0-d one and an empty one of its dtype. F4 (float4) is stored by
safetensors as 4-bit values, two a byte; weightsmith reports torch's shape for it (the header's
``[4, 6]`` is ``float4_e2m1fn_x2`` ``[4, 3]``), so the element count times the element size is
the byte length. Values torch cannot hold (F4 with an odd last dimension, the F6 kinds) are
refused with a `CheckpointError` naming the file, the key and the dtype.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from _in_checks import (SHARED_DTYPES, Case, Corpus, Spec, params, run,
                        same_bits, values, versions)
from safetensors.torch import load_file, save_file

import weightsmith as ws
from weightsmith.errors import CheckpointError
from weightsmith.io._dtypes import from_safetensors, to_safetensors

WRITER = "safetensors.torch.save_file"
VERSIONS = versions("torch", "safetensors")


def _build(dtype_name: str):
    def build(folder: Path) -> Case:
        dtype = getattr(torch, dtype_name)
        tensors = {"w": values(dtype, (4, 6)), "empty": values(dtype, (0, 3))}
        if dtype_name != "float4_e2m1fn_x2":  # safetensors cannot write a 0-d pair of 4-bit values
            tensors["scalar"] = values(dtype, (), seed=1)
        path = folder / f"{dtype_name}.safetensors"
        save_file(tensors, path, metadata={"format": "pt"})
        return Case(path, load_file(path))
    return build


def _spec(name: str) -> Spec:
    return Spec(name, WRITER, VERSIONS, _build(name))


SPECS = [_spec(n) for n in SHARED_DTYPES if hasattr(torch, n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("in_safetensors"))


@pytest.mark.parametrize(("spec", "check"), params(SPECS))
def test_safetensors_file(corpus: Corpus, spec: Spec, check: str, tmp_path: Path) -> None:
    run(spec, corpus.case(spec), check, tmp_path)


def _raw(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file written byte by byte, for entries the library will not write."""
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def test_f4_reports_torch_shape_and_reads_the_same_bytes(tmp_path: Path) -> None:
    packed = values(torch.float4_e2m1fn_x2, (4, 3))
    path = tmp_path / "f4.safetensors"
    save_file({"q": packed}, path)
    with ws.open(path) as ckpt:
        info = ckpt["q"]
        assert (info.shape, info.dtype, info.nbytes, info.numel) == ((4, 3), "float4_e2m1fn_x2", 12, 12)
        assert same_bits(ckpt.tensor("q"), load_file(path)["q"])
        assert same_bits(ckpt.tensor("q"), packed)


def test_f4_with_an_odd_last_dimension_is_refused_naming_file_key_and_dtype(tmp_path: Path) -> None:
    path = _raw(tmp_path / "odd.safetensors", {"q": {"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 3]}},
                bytes(3))
    with ws.open(path) as ckpt:
        assert ckpt["q"].shape == (2, 3)  # the header's, as no torch shape holds 3 values a row
        with pytest.raises(CheckpointError, match=r"odd\.safetensors.*'q'.*F4.*\[2, 3\].*multiple of 2"):
            ckpt.tensor("q")


@pytest.mark.parametrize("code", ["F6_E2M3", "F6_E3M2"])
def test_f6_kinds_torch_lacks_are_refused_naming_file_key_and_dtype(tmp_path: Path, code: str) -> None:
    if hasattr(torch, code.lower().replace("f6_", "float6_")):
        pytest.skip(f"this torch has a dtype for {code}")
    path = _raw(tmp_path / "f6.safetensors", {"v": {"dtype": code, "shape": [4], "data_offsets": [0, 3]},
                                              "ok": {"dtype": "F32", "shape": [1], "data_offsets": [3, 7]}},
                bytes(3) + struct.pack("<f", 1.5))
    with ws.open(path) as ckpt:
        assert ckpt.tensor("ok").item() == 1.5
        with pytest.raises(CheckpointError, match=rf"f6\.safetensors.*'v'.*{code}.*no float6"):
            ckpt.tensor("v")


@pytest.mark.parametrize(("code", "header", "name", "shape"), [
    ("F4", (4, 6), "float4_e2m1fn_x2", (4, 3)),
    ("F4", (0, 2), "float4_e2m1fn_x2", (0, 1)),
    ("F8_E4M3", (4, 6), "float8_e4m3fn", (4, 6)),
    ("U64", (), "uint64", ()),
])
def test_header_shape_and_torch_shape_map_both_ways(code: str, header: tuple, name: str, shape: tuple) -> None:
    assert from_safetensors(code, header) == (name, shape)
    assert to_safetensors(name, shape) == (code, header)


def test_odd_f4_keeps_the_header_shape_and_0d_packed_is_not_storable() -> None:
    assert from_safetensors("F4", (2, 3)) == ("float4_e2m1", (2, 3))
    assert from_safetensors("F4", ()) == ("float4_e2m1", ())
    assert to_safetensors("float4_e2m1fn_x2", ()) is None
    assert to_safetensors("complex128", (2,)) is None  # safetensors has no C128: never written
