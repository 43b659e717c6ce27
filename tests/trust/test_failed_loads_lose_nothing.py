"""A failed `load_` loses nothing: every value, flag, Parameter object and tie is as it was.

Random small models (Linear, LayerNorm, Embedding; sometimes a layer used twice, sometimes an
embedding tied to a linear layer; some parameters frozen) take checkpoints with faults injected:
a tensor of another shape, a tensor turned to int, a missing key under ``strict=True``, a read
that fails with ``OSError`` part-way through, a module whose loading raises part-way through,
a target that cannot be written in place (an expanded Parameter, on a random module). Each
failure is a `WeightsmithError`, whatever raised underneath.
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

_BREAKING = ("shape", "missing", "read error", "module raises", "unwritable target")


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
        "values": {k: (v.to_dense() if v.is_sparse else v).detach().clone() for k, v in model.state_dict().items()},
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
        if "unwritable target" in faults:
            index = data.draw(st.integers(0, len(model) - 1), "module with an expanded parameter")
            model[index].odd = nn.Parameter(torch.randn(1, 2).expand(3, 2))  # stride 0: 6 elements, 2 floats
            source[f"{index}.odd"] = torch.ones(3, 2)
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

        before, ties_before = _state(model), _ties(model)
        try:
            weightsmith.load_(model, ckpt, strict=True)
        except WeightsmithError as e:
            if isinstance(e.__cause__, RuntimeError) and "cannot load right now" in str(e.__cause__):
                assert "module raises" in faults
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


# -- targets that cannot take a value in place -------------------------------------------------------
class _Odd(nn.Module):
    """Two ordinary Parameters, then (registered last, so a copy-as-you-go load writes the others
    first) a tensor of the kind given."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Parameter(torch.randn(3))
        self.b = nn.Parameter(torch.randn(2, 3))
        if kind == "inference buffer":
            with torch.inference_mode():
                self.register_buffer("odd", torch.zeros(2, 3))
        elif kind == "expanded parameter":  # stride 0: six elements over three floats
            self.odd = nn.Parameter(torch.randn(1, 3).expand(2, 3))
        elif kind == "overlapping strides":  # no stride 0, and still (0, 1) and (1, 0) share a float
            self.odd = nn.Parameter(torch.randn(4).as_strided((2, 3), (1, 1)))
        elif kind == "sparse parameter":
            self.odd = nn.Parameter(torch.eye(2, 3).to_sparse())


def _source_for(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: torch.full(v.shape, 7.0) for k, v in model.state_dict().items()}


WAYS = ["load_ a dict", "load_ a file", "assign_", "restore_"]


def _write(model: nn.Module, source: dict[str, torch.Tensor], how: str, tmp_path: Path) -> None:
    """Write ``source`` into ``model`` one of the four ways a model is written (``WAYS``)."""
    if how == "load_ a dict":
        weightsmith.load_(model, source)
    elif how == "load_ a file":
        weightsmith.save(source, tmp_path / "s.safetensors")
        weightsmith.load_(model, tmp_path / "s.safetensors")
    elif how == "assign_":
        weightsmith.assign_(model, source)
    else:
        weightsmith.restore_(model, source)


@pytest.mark.parametrize("kind", ["expanded parameter", "overlapping strides", "sparse parameter"])
@pytest.mark.parametrize("how", WAYS)
def test_a_target_that_cannot_be_written_in_place_is_refused_before_the_first_write(
        tmp_path: Path, kind: str, how: str) -> None:
    model = _Odd(kind)
    source = _source_for(model)
    source["odd"] = torch.full((2, 3), 7.0)  # dense, whatever the target is
    before = _state(model)
    with pytest.raises(WeightsmithError) as info:
        _write(model, source, how, tmp_path)
    text = str(info.value)
    assert "'odd' (2, 3)" in text and "nothing was" in text  # the key, its shape, and that nothing changed
    why = {"sparse parameter": "sparse"}.get(kind, "share one memory location")
    assert why in text
    assert "first" in text  # the fix: what to do before loading
    _assert_unchanged(model, before)


def test_every_odd_target_is_listed_in_one_error() -> None:
    model = _Odd("expanded parameter")
    model.odd2 = nn.Parameter(torch.eye(2).to_sparse())
    source = {**_source_for(_Odd("expanded parameter")), "odd2": torch.zeros(2, 2)}
    before = _state(model)
    with pytest.raises(WeightsmithError) as info:
        weightsmith.load_(model, source)
    assert len(info.value.problems) == 2  # type: ignore[attr-defined]
    assert "'odd' (2, 3)" in info.value.problems[0] and "'odd2' (2, 2)" in info.value.problems[1]  # type: ignore
    _assert_unchanged(model, before)


def test_a_target_in_read_only_memory_is_refused_not_a_crash(tmp_path: Path) -> None:
    # a write into a read-only mapping kills the process (SIGSEGV): run it in a child
    code = f"""
import warnings, numpy as np, torch, weightsmith
from torch import nn
from weightsmith.errors import WeightsmithError
np.zeros(3, dtype=np.float32).tofile({str(tmp_path / "w.bin")!r})
warnings.simplefilter("ignore")  # torch warns that the array is not writable: that is the case
model = nn.Module()
model.a = nn.Parameter(torch.zeros(3))
model.register_buffer("ro", torch.from_numpy(np.memmap({str(tmp_path / "w.bin")!r}, dtype=np.float32, mode="r")))
for fn in (weightsmith.load_, weightsmith.assign_):
    try:
        fn(model, {{"a": torch.ones(3), "ro": torch.ones(3)}})
    except WeightsmithError as e:
        assert "'ro' (3,)" in str(e) and "read-only" in str(e), e
    else:
        raise SystemExit("loaded into read-only memory")
assert torch.equal(model.a, torch.zeros(3)) and torch.equal(model.ro, torch.zeros(3))
print("refused")
"""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "refused" in out.stdout, (out.returncode, out.stderr[-2000:])


@pytest.mark.parametrize("how", WAYS)
def test_an_inference_tensor_target_is_written_under_inference_mode(tmp_path: Path, how: str) -> None:
    model = _Odd("inference buffer")
    params = {k: p for k, p in model.named_parameters()}
    source = _source_for(model)
    _write(model, source, how, tmp_path)
    assert all(torch.equal(v, torch.full(v.shape, 7.0)) for v in model.state_dict().values())
    assert all(p is params[k] for k, p in model.named_parameters())  # the same objects
    assert model.odd.is_inference() and not model.a.is_inference() and model.a.requires_grad
    (model.a.sum() + model.b.sum()).backward()  # the Parameters still train
    assert torch.equal(model.a.grad, torch.ones(3))


def test_a_dcp_folder_loads_into_an_inference_buffer_and_refuses_an_expanded_target(tmp_path: Path) -> None:
    # a DCP folder is written into the model's own tensors chunk by chunk (no staged copy)
    source = _source_for(_Odd("inference buffer"))
    weightsmith.save(source, tmp_path / "ckpt", format="dcp")
    model = _Odd("inference buffer")
    weightsmith.load_(model, tmp_path / "ckpt")
    assert all(torch.equal(v, torch.full(v.shape, 7.0)) for v in model.state_dict().values())
    odd = _Odd("expanded parameter")
    before = _state(odd)
    with pytest.raises(WeightsmithError, match="share one memory location"):
        weightsmith.load_(odd, tmp_path / "ckpt")
    _assert_unchanged(odd, before)
