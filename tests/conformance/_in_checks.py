"""The "in" half of the conformance corpus: files other tools wrote, checked as weightsmith reads them.

A `Spec` names a writer and builds its file (or folder) with that writer's own API, returning a
`Case`: the path, what the writer's own loader reads back, and the model it fits, if any. Every
case runs the same `CHECKS`; a passing check adds a row to the conformance table (`record`).
Checks that fail only because of a fix made elsewhere carry a strict xfail naming it, so the
suite says when the mark must go.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from _conformance import record
from click.testing import CliRunner

import weightsmith as ws
from weightsmith.cli import cli

__all__ = ["CHECKS", "Case", "Spec", "Corpus", "params", "run", "same_bits", "values", "LEGACY_WRITER",
           "versions"]

CHECKS = ("read", "inspect", "check", "diff", "convert", "load")

# what each check proves, as the conformance table shows it
LABELS = {
    "read": "open: keys, shapes, dtypes, bit-identical to the writer's loader",
    "inspect": "inspect exit 0",
    "check": "check exit 0",
    "diff": "diff with itself exit 0",
    "convert": "convert to .safetensors and back to .pt, bit-identical",
    "load": "load_ into the model, bit-identical",
}

# reasons of the strict xfails: each names what still has to land
LEGACY_WRITER = "torch 2.13's legacy torch.save cannot write dtypes that have no typed storage"

# every dtype torch and safetensors share, by torch name
SHARED_DTYPES = ("bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                 "float16", "bfloat16", "float32", "float64", "complex64", "float8_e4m3fn", "float8_e5m2",
                 "float8_e8m0fnu", "float8_e4m3fnuz", "float8_e5m2fnuz", "float4_e2m1fn_x2")
# dtypes torch.save pickles through UntypedStorage and _rebuild_tensor_v3 (no legacy typed storage)
V3_DTYPES = {"uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu",
             "float8_e4m3fnuz", "float8_e5m2fnuz", "float4_e2m1fn_x2"}


def versions(*names: str) -> str:
    """``"torch 2.13.0, safetensors 0.8.0"`` for the named distributions."""
    import importlib.metadata as md

    out = []
    for name in names:
        v = torch.__version__ if name == "torch" else md.version(name)
        out.append(f"{name} {v.split('+')[0]}")
    return ", ".join(out)


@dataclass
class Case:
    """One written file and what its writer's own loader reads from it.

    Attributes:
        path: the file or folder.
        expected: key -> tensor, as the writer's loader returns them.
        model: builds the model the file fits (for the ``load`` check), if any.
        root: the nested dict weightsmith should read (``None``: its default).
        load_options: keyword arguments for `weightsmith.load_` (rename rules, ``strict``).
        model_key: maps a key of the file to the model's name for it.
        strides: also compare strides (files that store views, such as ``torch.save``'s).
    """

    path: Path
    expected: dict[str, torch.Tensor]
    model: Callable[[], torch.nn.Module] | None = None
    root: str | None = None
    load_options: dict[str, Any] = field(default_factory=dict)  # for `load_`: renames, strictness
    model_key: Callable[[str], str] = str  # a file key's name in the model
    strides: bool = False  # the writer keeps views' strides, and weightsmith must too


@dataclass(frozen=True)
class Spec:
    """A corpus file: its id, its writer (as the table names it), how to build it, expected failures.

    ``build(folder)`` writes the file under ``folder`` and returns its `Case`. ``xfail`` maps a
    check (or ``"*"``, every check) to the reason it still fails.
    """

    id: str
    writer: str
    versions: str
    build: Callable[[Path], Case]
    has_model: bool = False
    xfail: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # check -> what its error must say

    @property
    def checks(self) -> tuple[str, ...]:
        return tuple(c for c in CHECKS if c != "load" or self.has_model)


class Corpus:
    """Builds each spec's file once per module, on first use."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._cases: dict[str, Case] = {}

    def case(self, spec: Spec) -> Case:
        if spec.id not in self._cases:
            where = self.folder / spec.id
            where.mkdir()
            try:
                self._cases[spec.id] = spec.build(where)
            except Exception as e:  # every check of the spec reports the writer's failure
                self._cases[spec.id] = e  # type: ignore[assignment]
        case = self._cases[spec.id]
        if isinstance(case, Exception):
            raise AssertionError(f"writing {spec.id} with {spec.writer} failed: {case}") from case
        return case


def params(specs: list[Spec]) -> list[Any]:
    """One pytest param per (spec, check), ids ``spec-check``, xfail marks attached."""
    out = []
    for spec in specs:
        for check in spec.checks:
            reason = spec.xfail.get(check) or spec.xfail.get("*")
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(spec, check, id=f"{spec.id}-{check}", marks=marks))
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Same shape, dtype and bytes (NaN payloads and signed zeros included)."""
    return (tuple(got.shape) == tuple(want.shape) and got.dtype == want.dtype
            and torch.equal(_bytes(got), _bytes(want)))


def values(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Varied finite values of ``dtype`` that `check` finds healthy (no NaN, Inf, zeros, constants)."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype == getattr(torch, "float4_e2m1fn_x2", None):
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).view(dtype)
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype, generator=gen)
    if dtype == getattr(torch, "float8_e8m0fnu", None):  # powers of two only, no sign
        return (torch.rand(shape, generator=gen) * 8 + 0.1).to(dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(1, 120, shape, generator=gen).to(dtype)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every floating parameter and buffer with varied values, so `check` finds nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1 + 0.5)
    return model


def _cli(*args: str) -> None:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, f"weightsmith {' '.join(args)} exited {result.exit_code}:\n{result.output}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception


def _cli_refused(pattern: str, *args: str) -> None:
    import re

    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 2, f"weightsmith {' '.join(args)} exited {result.exit_code}:\n{result.output}"
    assert re.search(pattern, result.output), result.output


def _compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: keys {sorted(got)} != {sorted(want)}"
    bad = [k for k in want if not same_bits(got[k], want[k])]
    assert not bad, f"{what}: not bit-identical: " + ", ".join(
        f"{k} {got[k].dtype}{list(got[k].shape)} vs {want[k].dtype}{list(want[k].shape)}" for k in bad)


def _read(case: Case, tmp: Path) -> None:
    with ws.open(case.path, root=case.root) as ckpt:
        assert sorted(ckpt) == sorted(case.expected)
        for key, want in case.expected.items():
            info = ckpt[key]
            assert (info.shape, info.dtype) == (tuple(want.shape), str(want.dtype).removeprefix("torch.")), key
        got = {k: ckpt.tensor(k) for k in ckpt}
        _compare(got, case.expected, str(case.path))
        if case.strides:
            assert {k: got[k].stride() for k in got} == {k: v.stride() for k, v in case.expected.items()}


def _root_args(case: Case) -> list[str]:
    return ["--root", case.root] if case.root else []


def _convert(case: Case, tmp: Path) -> None:
    from safetensors.torch import load_file

    there, back = tmp / "round.safetensors", tmp / "round.pt"
    _cli("convert", str(case.path), str(there), "--quiet", *_root_args(case))
    stored = load_file(there)  # safetensors' own reader: ties are kept once, under one key
    assert set(stored) <= set(case.expected)
    _compare(stored, {k: case.expected[k] for k in stored}, f"{there} by safetensors.torch.load_file")
    with ws.open(there) as ckpt:
        _compare({k: ckpt.tensor(k) for k in ckpt}, case.expected, f"{there} by weightsmith")
    _cli("convert", str(there), str(back), "--quiet")
    _compare(torch.load(back, weights_only=True), case.expected, f"{back} by torch.load")


def _load(case: Case, tmp: Path) -> None:
    assert case.model is not None
    model = case.model()
    ws.load_(model, case.path, **({"root": case.root} if case.root else {}), **case.load_options)
    state = model.state_dict()
    _compare({k: state[case.model_key(k)] for k in case.expected}, case.expected, f"model loaded from {case.path}")


def run(spec: Spec, case: Case, check: str, tmp: Path) -> None:
    """Run one check on one case; on success, add its row to the conformance table."""
    path = str(case.path)
    if check in spec.refused:  # weightsmith must say no, with a reason
        assert check == "convert"
        _cli_refused(spec.refused[check], "convert", path, str(tmp / "round.safetensors"), "--quiet")
        return
    if check == "read":
        _read(case, tmp)
    elif check == "inspect":
        _cli("inspect", path, *_root_args(case))
    elif check == "check":
        _cli("check", path, "--quiet")
    elif check == "diff":
        _cli("diff", "--quiet", path, path)
    elif check == "convert":
        _convert(case, tmp)
    elif check == "load":
        _load(case, tmp)
    else:  # pragma: no cover
        raise AssertionError(check)
    record(direction="in", writer=spec.writer, reader="weightsmith", check=LABELS[check],
           versions=spec.versions)
