"""float8 and unsigned dtypes in files written by ``torch.save`` and ``dcp.save``, read bit-identically.

torch pickles dtypes without a legacy typed storage as ``torch.storage.UntypedStorage`` (bytes)
rebuilt with ``torch._utils._rebuild_tensor_v3(..., dtype)``; each file here is written by
torch itself, zip and legacy, and compared byte for byte with the tensors written and with
``torch.load(weights_only=True)`` (which reads the zip files; torch 2.13 cannot read back the
legacy files it writes for these dtypes).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import weightsmith

DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu, torch.uint16, torch.uint32, torch.uint64]


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for d in shape:
        numel *= d
    raw = torch.randint(0, 256, (numel * size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return raw.view(dtype).reshape(shape)


def _state(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    base = _random((6, 4), dtype, 0)
    return {
        "w": base,
        "t": base.t(),                # a non-contiguous view of the same storage
        "row": base[2],               # an offset into it
        "v": _random((5,), dtype, 1),
        "f": torch.arange(3.0),       # a typed storage next to the untyped ones
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_save_of_modern_dtypes_reads_bit_identical(tmp_path: Path, dtype: torch.dtype, legacy: bool) -> None:
    path = tmp_path / "m.pt"
    want = _state(dtype)
    torch.save(want, path, _use_new_zipfile_serialization=not legacy)
    if not legacy:  # torch 2.13 writes legacy files of these dtypes but cannot read them back
        loaded = torch.load(path, weights_only=True)
        assert all(torch.equal(_bits(loaded[k]), _bits(v)) for k, v in want.items())

    ck = weightsmith.open(path)
    got = ck.load()
    assert sorted(got) == sorted(want)
    for key, ref in want.items():
        assert got[key].dtype == ref.dtype, key
        assert got[key].shape == ref.shape, key
        assert torch.equal(_bits(got[key]), _bits(ref)), key
        assert ck[key].dtype == str(ref.dtype).removeprefix("torch."), key
    ck.close()


def test_a_tensor_viewed_as_another_dtype_keeps_both_readings(tmp_path: Path) -> None:
    raw = _random((16,), torch.uint8, 3)
    path = tmp_path / "views.pt"
    torch.save({"bytes": raw, "words": raw.view(torch.uint32), "fp8": raw.view(torch.float8_e5m2)}, path)
    want = torch.load(path, weights_only=True)
    got = weightsmith.open(path).load()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(_bits(got[key]), _bits(want[key])), key


def test_dcp_folders_of_modern_dtypes_read_bit_identical(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    state = {f"x{i}": _random((4, 3), dtype, i) for i, dtype in enumerate(DTYPES)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
        want = {k: torch.zeros_like(v) for k, v in state.items()}
        dcp.load(want, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)

    got = weightsmith.open(tmp_path / "ckpt").load()
    for key, ref in want.items():
        assert got[key].dtype == ref.dtype and torch.equal(_bits(got[key]), _bits(ref)), key
