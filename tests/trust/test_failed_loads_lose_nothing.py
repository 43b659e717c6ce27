"""A failed `load_` loses nothing: every value, flag, Parameter object and tie is as it was.

Random small models (Linear, LayerNorm, Embedding; sometimes a layer used twice, sometimes an
embedding tied to a linear layer; some parameters frozen) take checkpoints with faults injected:
a tensor of another shape, a tensor turned to int, a missing key under ``strict=True``, a read
that fails with ``OSError`` part-way through, a module whose loading raises part-way through.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import weightsmith
from weightsmith.errors import WeightsmithError

_BREAKING = ("shape", "missing", "read error", "module raises")


def _build(specs: list[tuple[Any, ...]], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for spec in specs:
        if spec[0] == "linear":
            layers.append(nn.Linear(spec[1], spec[2], bias=spec[3]))
        elif spec[0] == "norm":
            layers.append(nn.LayerNorm(spec[1]))
        elif spec[0] == "embedding":
            layers.append(nn.Embedding(spec[1], spec[2]))
        elif spec[0] == "reuse":  # the same module again: its keys are tied
            layers.append(layers[spec[1] % len(layers)])
    model = nn.Sequential(*layers)
    # tie an embedding to a linear layer of the transposed shape, as language models do
    embeddings = [m for m in model if isinstance(m, nn.Embedding)]
    for m in model:
        if isinstance(m, nn.Linear) and embeddings and m.weight.shape == embeddings[0].weight.shape:
            m.weight = embeddings[0].weight
            break
    return model


@st.composite
def models(draw: Any) -> tuple[list[tuple[Any, ...]], set[str]]:
    dims = st.integers(1, 6)
    specs: list[tuple[Any, ...]] = []
    for i in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["linear", "norm", "embedding", "reuse"] if i else ["linear", "embedding"]))
        if kind == "linear":
            specs.append(("linear", draw(dims), draw(dims), draw(st.booleans())))
        elif kind == "norm":
            specs.append(("norm", draw(dims)))
        elif kind == "embedding":
            specs.append(("embedding", draw(dims), draw(dims)))
        else:
            specs.append(("reuse", draw(st.integers(0, 10))))
    names = [n for n, _ in _build(specs, 0).named_parameters()]
    frozen = draw(st.sets(st.sampled_from(names)))
    return specs, frozen


class _FailingReads:
    """Makes the ``k``-th tensor read of an open checkpoint fail, as a disk error would."""

    def __init__(self, ckpt: Any, k: int) -> None:
        self.calls, self.k = 0, k
        self.real = ckpt.reader.tensor
        ckpt.reader.tensor = self

    def __call__(self, key: str) -> Any:
        self.calls += 1
        if self.calls == self.k:
            raise OSError(errno.EIO, f"Input/output error reading {key}")
        return self.real(key)


class _LazyMapping(Mapping[str, Any]):
    """A mapping that reads values on access, and whose ``k``-th read fails."""

    def __init__(self, data: dict[str, Any], k: int) -> None:
        self._data, self._k, self._reads = data, k, 0

    def __getitem__(self, key: str) -> Any:
        self._reads += 1
        if self._reads == self._k:
            raise OSError(errno.EIO, f"Input/output error reading {key}")
        return self._data[key]

    def __iter__(self) -> Any:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def _state(model: nn.Module) -> dict[str, Any]:
    """Everything a failed load must leave alone."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return {
        "values": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "flags": {k: p.requires_grad for k, p in params.items()},
        "ids": {k: id(p) for k, p in params.items()},
    }


def _assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = _state(model)
    assert after["ids"] == before["ids"], "Parameter objects were replaced"
    assert after["flags"] == before["flags"], "requires_grad flags changed"
    assert after["values"].keys() == before["values"].keys()
    changed = [k for k, v in after["values"].items() if not torch.equal(v, before["values"][k])]
    assert not changed, f"values changed: {changed}"


def _ties(model: nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return sorted(g for g in groups.values() if len(g) > 1)


def test_a_failed_load_leaves_the_model_exactly_as_it_was(tmp_path: Path) -> None:
    seen: dict[str, int] = {}

    @settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(model_spec=models(), data=st.data())
    def check(model_spec: tuple[list[tuple[Any, ...]], set[str]], data: st.DataObject) -> None:
        specs, frozen = model_spec
        model = _build(specs, seed=0)
        for name, p in model.named_parameters(remove_duplicate=False):
            p.requires_grad_(name not in frozen)
        source = {k: v.detach().clone() for k, v in _build(specs, seed=1).state_dict().items()}
        keys = sorted(source)
        faults = data.draw(st.lists(st.sampled_from(_BREAKING), min_size=1, max_size=2, unique=True), "faults")
        if data.draw(st.booleans(), "int too"):
            faults.append("int")  # alone, an int source is cast and loads; here it rides along
        for fault in faults:
            seen[fault] = seen.get(fault, 0) + 1
        ties_before = _ties(model)

        if "shape" in faults:
            key = data.draw(st.sampled_from(keys), "reshaped key")
            source[key] = torch.zeros(*source[key].shape, 2)
        if "int" in faults:
            key = data.draw(st.sampled_from(keys), "int key")
            source[key] = (source[key] * 100).to(torch.int64)
        if "missing" in faults:
            key = data.draw(st.sampled_from(keys), "missing key")
            for name in [g for g in _ties(_build(specs, 0)) if key in g] or [[key]]:
                for k in name:
                    source.pop(k, None)  # the whole tie group: otherwise the tie fills the gap
        if not source:
            source["unrelated.weight"] = torch.zeros(1)
        path = tmp_path / "source.safetensors"
        weightsmith.save(source, path)
        ckpt: Any = weightsmith.open(path)
        if "read error" in faults and data.draw(st.booleans(), "lazy mapping"):
            # a mapping reading values on access: any of its first len() reads may fail
            ckpt = _LazyMapping(source, data.draw(st.integers(1, len(source)), "failing read"))
        elif "read error" in faults:
            reads = len(weightsmith.plan(model, ckpt).loaded)
            _FailingReads(ckpt, data.draw(st.integers(1, max(reads, 1)), "failing read"))
        if "module raises" in faults:
            victim = data.draw(st.sampled_from(list(model)), "raising module")

            def refuse(*_args: Any) -> None:
                raise RuntimeError("this module cannot load right now")

            victim._register_load_state_dict_pre_hook(refuse)  # noqa: SLF001 - a fault, on purpose

        before = _state(model)
        try:
            weightsmith.load_(model, ckpt, strict=True)
        except (WeightsmithError, RuntimeError) as e:
            if not isinstance(e, WeightsmithError):
                assert "module raises" in faults and "cannot load right now" in str(e)
        else:
            pytest.fail(f"faults {faults} did not stop the load")
        _assert_unchanged(model, before)
        assert _ties(model) == ties_before

    check()
    assert set(seen) == {*_BREAKING, "int"}, seen  # every fault was tried


def test_an_int_source_for_a_float_parameter_is_cast_and_reported(tmp_path: Path) -> None:
    # not a fault by itself: the plan casts, and says so
    model = nn.Sequential(nn.Linear(2, 2))
    source = {"0.weight": torch.tensor([[1, 2], [3, 4]]), "0.bias": torch.tensor([5, 6])}
    report = weightsmith.load_(model, source)
    assert torch.equal(model[0].weight.detach(), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert "cast int64->float32" in report.provenance["0.weight"]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_a_mapping_source_whose_kth_read_fails_raises_a_weightsmith_error(k: int) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    before = _state(model)
    source = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    with pytest.raises(WeightsmithError, match="Input/output error"):
        weightsmith.load_(model, _LazyMapping(source, k=k))
    _assert_unchanged(model, before)
