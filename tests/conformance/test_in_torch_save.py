"""In: ``torch.save`` files, zip and legacy, one per dtype, with shared-storage views and strides.

Each file holds a base tensor, a row slice sharing its storage at an offset, its transpose (not
contiguous), a 0-d tensor and an empty one. Dtypes without a legacy typed storage (float8,
uint16-64, float4) are pickled as ``UntypedStorage`` rebuilt by ``_rebuild_tensor_v3``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _in_checks import (LEGACY_WRITER, SHARED_DTYPES, V3_DTYPES, Case, Corpus, Spec,
                        params, run, values, versions)

VERSIONS = versions("torch")
DTYPES = [n for n in (*SHARED_DTYPES, "complex128") if hasattr(torch, n)]


def _build(dtype_name: str, zipped: bool):
    def build(folder: Path) -> Case:
        dtype = getattr(torch, dtype_name)
        base = values(dtype, (4, 6))
        tensors = {"w": base, "rows": base[1:3], "t": base.t(), "scalar": values(dtype, (), seed=1),
                   "empty": values(dtype, (0, 3))}
        path = folder / f"{dtype_name}.pt"
        torch.save(tensors, path, _use_new_zipfile_serialization=zipped)
        return Case(path, torch.load(path, weights_only=True), strides=True)
    return build


def _spec(name: str, zipped: bool) -> Spec:
    xfail: dict[str, str] = {}
    if name in V3_DTYPES and not zipped:
        xfail["*"] = LEGACY_WRITER
    refused = {"convert": r"safetensors cannot store .*complex128"} if name == "complex128" else {}
    if name == "float4_e2m1fn_x2":  # the file's 0-d value: a safetensors header can only give the pair as a dimension
        refused = {"convert": r"'scalar' is a 0-d torch\.float4_e2m1fn_x2"}
    kind = "zip" if zipped else "legacy"
    writer = "torch.save" if zipped else "torch.save (legacy, _use_new_zipfile_serialization=False)"
    return Spec(f"{kind}-{name}", writer, VERSIONS, _build(name, zipped), xfail=xfail,
                refused=refused)


SPECS = [_spec(n, z) for z in (True, False) for n in DTYPES]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("in_torch_save"))


@pytest.mark.parametrize(("spec", "check"), params(SPECS))
def test_torch_save_file(corpus: Corpus, spec: Spec, check: str, tmp_path: Path) -> None:
    run(spec, corpus.case(spec), check, tmp_path)
