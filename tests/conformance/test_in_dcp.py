"""In: ``torch.distributed.checkpoint`` folders, by ``dcp.save`` and by DCP's Hugging Face storage writer.

``dcp.save`` writes each tensor as a small ``torch.save`` archive inside ``.distcp`` files, so
dtypes without a legacy typed storage (float8, uint16-64, float4) need the pickle reader's
``_rebuild_tensor_v3`` support; the Hugging Face writer stores the same tensors as safetensors.
Expected values come from ``dcp.load`` with the matching storage reader.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from _in_checks import (Case, Corpus, Spec, params,
                        randomize_, run, values, versions)
from torch import nn

import weightsmith as ws
from weightsmith.errors import CheckpointError

VERSIONS = versions("torch")


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def _tensors(names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for i, name in enumerate(names):
        dtype = getattr(torch, name)
        out[name] = values(dtype, (4, 6), seed=i)
        if name != "float4_e2m1fn_x2":
            out[f"{name}.scalar"] = values(dtype, (), seed=i + 100)
        out[f"{name}.empty"] = values(dtype, (0, 3))
    return out


def _save_and_load(state: dict[str, torch.Tensor], folder: Path, *, hf: bool = False) -> dict[str, torch.Tensor]:
    """Write ``state`` with DCP; what ``dcp.load`` reads back into fresh tensors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group": one process saves alone, as intended
        if hf:
            dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(path=str(folder)), no_dist=True)
        else:
            dcp.save(state, checkpoint_id=folder, no_dist=True)
        loaded = {k: torch.empty_like(v) for k, v in state.items()}
        if hf:
            dcp.load(loaded, storage_reader=dcp.HuggingFaceStorageReader(path=str(folder)), no_dist=True)
        else:
            dcp.load(loaded, checkpoint_id=folder, no_dist=True)
    return loaded


def _dtypes_case(names: tuple[str, ...], *, hf: bool = False):
    def build(folder: Path) -> Case:
        path = folder / "ckpt"
        return Case(path, _save_and_load(_tensors(names), path, hf=hf))
    return build


def _hf_e8m0_case(folder: Path) -> Case:
    """float8_e8m0fnu through the Hugging Face writer; torch's own reader of that layout fails on
    ``F8_E8M0``, so the expected values come from safetensors' loader of the written shards."""
    from safetensors.torch import load_file

    path = folder / "ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(_tensors(("float8_e8m0fnu",)), storage_writer=dcp.HuggingFaceStorageWriter(path=str(path)),
                 no_dist=True)
    expected: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        expected.update(load_file(shard))
    return Case(path, expected)


def _model_case(folder: Path) -> Case:
    path = folder / "ckpt"
    torch.manual_seed(0)
    state = randomize_(_model()).state_dict()
    return Case(path, _save_and_load(dict(state), path), model=_model)


FP8 = ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu")
UINT = ("uint16", "uint32", "uint64")
SPECS = [
    Spec("model", "dcp.save", VERSIONS, _model_case, has_model=True),
    Spec("plain-dtypes", "dcp.save", VERSIONS,
         _dtypes_case(("float32", "bfloat16", "float16", "float64", "int64", "int8", "uint8", "bool", "complex64"))),
    Spec("float8", "dcp.save", VERSIONS, _dtypes_case(FP8)),
    Spec("uint16-64", "dcp.save", VERSIONS, _dtypes_case(UINT)),
    Spec("float4", "dcp.save", VERSIONS, _dtypes_case(("float4_e2m1fn_x2",))),
    Spec("hf-writer", "dcp.save with HuggingFaceStorageWriter", VERSIONS,
         # not float8_e8m0fnu: torch's own HuggingFaceStorageReader cannot read F8_E8M0 back
         _dtypes_case(("float32", "bfloat16", "int64", "bool", "float8_e4m3fn", "float8_e5m2", *UINT), hf=True)),
    Spec("hf-writer-e8m0", "dcp.save with HuggingFaceStorageWriter", VERSIONS, _hf_e8m0_case),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("in_dcp"))


@pytest.mark.parametrize(("spec", "check"), params(SPECS))
def test_dcp_folder(corpus: Corpus, spec: Spec, check: str, tmp_path: Path) -> None:
    run(spec, corpus.case(spec), check, tmp_path)


@pytest.mark.parametrize("names", [FP8, UINT, ("float4_e2m1fn_x2",)], ids=["float8", "uint16-64", "float4"])
def test_dcp_metadata_of_modern_dtypes_lists_without_reading_data(tmp_path: Path, names: tuple[str, ...]) -> None:
    state = _tensors(names)
    _save_and_load(state, tmp_path / "ckpt")
    with ws.open(tmp_path / "ckpt") as ckpt:
        assert {k: (ckpt[k].shape, ckpt[k].dtype) for k in ckpt} == {
            k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}


def test_dcp_dtype_weightsmith_cannot_size_is_refused_naming_file_key_and_dtype(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    _save_and_load({"w": torch.randn(2, 2)}, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = dcp.FileSystemReader(str(folder)).read_metadata()
    meta.state_dict_metadata["w"].properties.dtype = torch.bits16  # no element size weightsmith knows
    with open(folder / ".metadata", "wb") as f:  # as DCP writes it
        pickle.dump(meta, f)
    with pytest.raises(CheckpointError, match=r"\.metadata.*'w'.*bits16"):
        ws.open(folder)
