"""The "out" corpus: what every weightsmith writer produces, for other tools' readers to check.

`state()` holds one tensor of every dtype torch and the formats share (fp8 ×3, float4, uint16–64,
complex, bool), a 0-d, an empty and a non-contiguous tensor, and a tied pair. `WRITERS` writes it
with each weightsmith writer (`save` and `convert`, to each format). `tf4_python()` finds the
separate environment with the last transformers 4.x release that `make tf4` builds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import weightsmith as ws

REPO = Path(__file__).resolve().parents[2]
TF4_DIR = Path(os.environ.get("WS_TF4_PATH") or REPO / ".venv-tf4")

_DTYPES = ["float32", "float16", "bfloat16", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
           "uint32", "uint64", "complex64", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "float4_e2m1fn_x2"]
TIED = ("tied.a", "tied.b")


def _random(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    size = torch.empty(0, dtype=dtype).element_size()
    n = 1
    for d in shape:
        n *= d
    raw = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def state(*, float4: bool = True) -> dict[str, torch.Tensor]:
    """One tensor of every dtype, plus the awkward shapes and a tie (bit patterns, NaNs included)."""
    g = torch.Generator().manual_seed(0)
    out = {f"dtype.{name}": _random((3, 4), getattr(torch, name), g) for name in _DTYPES
           if float4 or name != "float4_e2m1fn_x2"}
    out["dtype.bool"] = torch.tensor([True, False, True])
    out["shape.scalar"] = torch.tensor(2.5)
    out["shape.empty"] = torch.empty(0, 3)
    out["layout.transposed"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    shared = torch.randn(4, 4, generator=g)
    out[TIED[0]], out[TIED[1]] = shared, shared
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, so NaN patterns and sub-byte kinds compare exactly."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and torch.equal(bits(a), bits(b))


def source_file(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """The input of `convert`: a safetensors file written by safetensors itself (ties stored twice)."""
    from safetensors.torch import save_file

    path = folder / "source.safetensors"
    if not path.exists():
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return path


def _save(fmt: str) -> Callable[[Path, dict[str, torch.Tensor]], Path]:
    def write(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
        path = folder / {"safetensors": "out.safetensors", "torch": "out.pt", "sharded": "out", "dcp": "out"}[fmt]
        options: dict[str, Any] = {"max_shard_size": "200B"} if fmt == "sharded" else {}
        if fmt == "dcp":
            options["format"] = "dcp"
        ws.save(tensors, path, **options)
        return path

    return write


def _convert(fmt: str) -> Callable[[Path, dict[str, torch.Tensor]], Path]:
    def write(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
        path = folder / {"safetensors": "out.safetensors", "torch": "out.pt", "sharded": "out", "dcp": "out"}[fmt]
        options: dict[str, Any] = {"max_shard_size": "200B"} if fmt == "sharded" else {}
        if fmt == "dcp":
            options["format"] = "dcp"
        ws.convert(source_file(folder, tensors), path, **options)
        return path

    return write


# writer name -> (function, format); `convert` reads its input with weightsmith, so its corpus leaves
# float4 out: weightsmith's safetensors reader does not map F4 to torch's packed dtype yet
WRITERS: dict[str, tuple[Callable[[Path, dict[str, torch.Tensor]], Path], str]] = {
    **{f"weightsmith.save -> {fmt}": (_save(fmt), fmt) for fmt in ("safetensors", "torch", "sharded", "dcp")},
    **{f"weightsmith.convert -> {fmt}": (_convert(fmt), fmt) for fmt in ("safetensors", "torch", "sharded", "dcp")},
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def tf4_env() -> dict[str, str]:
    """The environment running the main interpreter with transformers 4.x first on its path.

    Skips when `make tf4` has not built it, except in CI, where its absence fails the test.
    """
    if not (TF4_DIR / "transformers").is_dir():
        message = f"no transformers 4.x environment at {TF4_DIR}; build it with `make tf4`"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    env = {**os.environ, "PYTHONPATH": str(TF4_DIR), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    return env


def run_tf4(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script), *args], env=tf4_env(), capture_output=True, text=True,
                          timeout=300, check=False)
