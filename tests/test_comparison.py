"""`diff`: key alignment, per-tensor metrics against a float64 reference, NaN rules, checksums."""

import math

import pytest
import torch
from safetensors.torch import save_file

import weightsmith
import weightsmith.comparison as diff_module
from weightsmith.errors import CheckpointNotFoundError, SelectorError, UsageError


def reference(a: torch.Tensor, b: torch.Tensor) -> dict:
    """The metrics computed directly in float64."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    d = a64 - b64
    return {"max_abs": d.abs().max().item(), "rel_l2": (d.norm() / a64.norm()).item(),
            "cosine": torch.nn.functional.cosine_similarity(a64, b64, dim=0).item(),
            "changed": int((d != 0).sum())}


def save_plain(state, path):
    """A safetensors file without weightsmith's checksums (the data must be read)."""
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture
def mlp_file(tmp_path, mlp):
    return save_plain(mlp.state_dict(), tmp_path / "a.safetensors")


def test_identical_files_are_equal(tmp_path, mlp, mlp_file):
    other = save_plain(mlp.state_dict(), tmp_path / "b.safetensors")
    d = weightsmith.diff(mlp_file, other)
    assert d.equal
    assert [t.key for t in d.tensors] == list(weightsmith.open(mlp_file))  # a's file order
    assert all(t.identical and t.method == "compared" and t.max_abs == 0 for t in d.tensors)
    assert d.summary == "equal: 4 tensors identical"
    assert isinstance(d, weightsmith.Diff)


def test_one_changed_tensor_is_reported_with_reference_metrics(tmp_path, mlp, mlp_file):
    torch.manual_seed(1)
    state = {k: v.clone() for k, v in mlp.state_dict().items()}
    state["0.weight"] += 0.01 * torch.randn(8, 4)
    d = weightsmith.diff(mlp_file, save_plain(state, tmp_path / "b.safetensors"))
    assert not d.equal
    assert [t.key for t in d.changed] == ["0.weight"]
    t = d.changed[0]
    ref = reference(mlp.state_dict()["0.weight"], state["0.weight"])
    assert t.max_abs == pytest.approx(ref["max_abs"], rel=1e-6)
    assert t.rel_l2 == pytest.approx(ref["rel_l2"], rel=1e-5)
    assert t.cosine == pytest.approx(ref["cosine"], abs=1e-7)
    assert t.changed == ref["changed"] == 32 and t.changed_fraction == 1.0
    assert (t.nan_a, t.nan_b) == (0, 0)
    assert all(u.identical for u in d.tensors if u.key != "0.weight")


@pytest.mark.parametrize("kernel", ["numpy", "compiled"])
def test_metrics_over_many_chunks_and_threads_match_the_reference(tmp_path, monkeypatch, kernel):
    """Small chunks force the chunked path (threaded with the compiled kernel); a transposed
    (strided) tensor from a torch file is compared piece by piece against a contiguous one."""
    monkeypatch.setenv("WEIGHTSMITH_KERNEL", kernel)
    monkeypatch.setattr(diff_module, "CHUNK_ELEMENTS", 37)
    monkeypatch.setattr(diff_module, "_WORKERS", 2)
    torch.manual_seed(0)
    a = {"w": torch.randn(50, 30), "t": torch.randn(40, 20).t(), "h": torch.randn(300).to(torch.bfloat16)}
    b = {"w": a["w"] + 1e-3 * torch.randn(50, 30), "t": a["t"].contiguous() * 1.5,
         "h": (a["h"].float() + 0.25).to(torch.bfloat16)}
    torch.save(a, tmp_path / "a.pt")
    d = weightsmith.diff(tmp_path / "a.pt", save_plain(b, tmp_path / "b.safetensors"))
    assert weightsmith.open(tmp_path / "a.pt").tensor("t").is_contiguous() is False
    for key in a:
        ref, got = reference(a[key], b[key]), next(t for t in d.tensors if t.key == key)
        assert got.max_abs == pytest.approx(ref["max_abs"], rel=1e-6)
        assert got.rel_l2 == pytest.approx(ref["rel_l2"], rel=1e-5)
        assert got.cosine == pytest.approx(ref["cosine"], abs=1e-6)
        assert got.changed == ref["changed"]


def test_tolerance_decides_what_counts_as_changed(mlp):
    a = mlp.state_dict()
    b = {k: v + 1e-4 for k, v in a.items()}
    assert not weightsmith.diff(a, b).equal
    loose = weightsmith.diff(a, b, atol=1e-3)
    assert loose.equal and not any(t.identical for t in loose.tensors)
    assert loose.summary.startswith("equal within atol=0.001")
    # relative: |a - b| <= rtol * |a| holds only where |a| is large enough
    x = {"x": torch.tensor([1.0, 100.0])}
    y = {"x": torch.tensor([1.5, 100.5])}
    assert weightsmith.diff(x, y, rtol=0.01).tensors[0].changed == 1


def test_renamed_keys_pair_with_a_rule(tmp_path, mlp):
    state = mlp.state_dict()
    renamed = {k.replace("2.", "head.", 1) if k.startswith("2.") else k: v for k, v in state.items()}
    without = weightsmith.diff(state, renamed)
    assert without.only_a == ["2.weight", "2.bias"] and without.only_b == ["head.weight", "head.bias"]
    with_rule = weightsmith.diff(state, renamed, rename=[("2", "head")])
    assert with_rule.equal
    assert with_rule.renamed == {"2.weight": "head.weight", "2.bias": "head.bias"}
    assert {t.key: t.key_a for t in with_rule.tensors}["head.weight"] == "2.weight"


def test_reshaped_tensor_is_a_shape_change(mlp):
    a = mlp.state_dict()
    b = {**a, "0.weight": a["0.weight"].reshape(4, 8)}
    d = weightsmith.diff(a, b)
    assert not d.equal
    assert [(c.key, c.shape_a, c.shape_b) for c in d.shape_changes] == [("0.weight", (8, 4), (4, 8))]
    assert "0.weight" not in [t.key for t in d.tensors]
    assert "1 shape change" in d.summary


def test_dtype_change_is_reported_and_values_still_compared(mlp):
    a = mlp.state_dict()
    b = {**a, "0.weight": a["0.weight"].half()}
    d = weightsmith.diff(a, b)
    assert [(c.key, c.dtype_a, c.dtype_b) for c in d.dtype_changes] == [("0.weight", "float32", "float16")]
    t = next(t for t in d.tensors if t.key == "0.weight")
    ref = reference(a["0.weight"], b["0.weight"])
    assert 0 < t.max_abs == pytest.approx(ref["max_abs"], rel=1e-6)
    assert not d.equal


def test_nan_on_both_sides_is_equal_and_on_one_side_is_a_change():
    nan, inf = float("nan"), float("inf")
    a = {"x": torch.tensor([1.0, nan, 3.0, inf])}
    same = weightsmith.diff(a, {"x": torch.tensor([1.0, nan, 3.0, inf])})
    assert same.equal and same.tensors[0].identical
    assert (same.tensors[0].nan_a, same.tensors[0].nan_b) == (1, 1)
    other = weightsmith.diff(a, {"x": torch.tensor([1.0, 2.0, 3.5, -inf])})
    t = other.tensors[0]
    assert not other.equal
    assert (t.nan_a, t.nan_b) == (1, 0)
    assert t.changed == 3  # the NaN, the 3 -> 3.5, and +inf -> -inf
    assert t.max_abs == 0.5  # over elements finite on both sides
    assert t.rel_l2 == pytest.approx(0.5 / math.sqrt(1 + 9))


def test_prefix_wrapped_checkpoint_aligns_with_plain(tmp_path, mlp):
    wrapped = {f"module.{k}": v for k, v in mlp.state_dict().items()}
    path = save_plain(wrapped, tmp_path / "ddp.safetensors")
    d = weightsmith.diff(path, mlp)
    assert d.equal and d.prefix == "strip 'module.'"
    assert {t.key: t.key_a for t in d.tensors}["0.weight"] == "module.0.weight"
    assert weightsmith.diff(mlp, path).equal  # and the other way round


def test_checksums_decide_identical_tensors_without_reading(tmp_path, mlp, monkeypatch):
    weightsmith.save(mlp, tmp_path / "a.safetensors")
    weightsmith.save(mlp, tmp_path / "b.safetensors")
    state = {k: v.clone() for k, v in mlp.state_dict().items()}
    state["2.bias"] += 1
    weightsmith.save(state, tmp_path / "c.safetensors")
    read: list[str] = []
    measure = diff_module._measure_pair

    def spy(side_a, side_b, ka, kb, *args):
        read.append(kb)
        return measure(side_a, side_b, ka, kb, *args)

    monkeypatch.setattr(diff_module, "_measure_pair", spy)
    same = weightsmith.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert same.equal and read == []
    assert {t.method for t in same.tensors} == {"checksum"}
    assert same.tensors[0].nan_a is None  # not read, so not counted
    changed = weightsmith.diff(tmp_path / "a.safetensors", tmp_path / "c.safetensors")
    assert read == ["2.bias"]  # only the pair whose checksums differ was read
    assert [t.key for t in changed.changed] == ["2.bias"] and changed.changed[0].max_abs == 1.0


def test_without_checksums_every_pair_is_read(tmp_path, mlp, monkeypatch):
    weightsmith.save(mlp, tmp_path / "a.safetensors")
    plain = save_plain(mlp.state_dict(), tmp_path / "b.safetensors")
    calls = []
    measure = diff_module._measure_pair
    monkeypatch.setattr(diff_module, "_measure_pair", lambda *a: calls.append(a[3]) or measure(*a))
    assert weightsmith.diff(tmp_path / "a.safetensors", plain).equal
    assert sorted(calls) == sorted(mlp.state_dict())


def test_tied_pairs_are_read_once(tmp_path, tied_mlp, monkeypatch):
    torch.save(tied_mlp.state_dict(), tmp_path / "a.pt")
    other = {k: v.clone() for k, v in tied_mlp.state_dict().items()}
    weightsmith.save({**other, "3.weight": other["1.weight"], "3.bias": other["1.bias"]}, tmp_path / "b.safetensors")
    calls = []
    measure = diff_module._measure_pair
    monkeypatch.setattr(diff_module, "_measure_pair", lambda *a: calls.append(a[3]) or measure(*a))
    d = weightsmith.diff(tmp_path / "a.pt", tmp_path / "b.safetensors")
    assert d.equal and len(d.tensors) == 8
    assert "3.weight" not in calls and "1.weight" in calls


def test_models_compare_and_an_optimizer_step_shows_up(mlp):
    import copy

    before = copy.deepcopy(mlp)
    assert weightsmith.diff(before, mlp).equal
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    mlp(torch.randn(3, 4)).sum().backward()
    opt.step()
    d = weightsmith.diff(before, mlp)
    assert {t.key for t in d.changed} == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert d.a == d.b == "<Sequential>"


def test_same_checkpoint_twice_is_decided_without_reading(tmp_path, mlp_file, monkeypatch):
    ckpt = weightsmith.open(mlp_file)
    monkeypatch.setattr(diff_module, "_measure_pair", lambda *a: pytest.fail("read"))
    d = weightsmith.diff(ckpt, ckpt)
    assert d.equal and {t.method for t in d.tensors} == {"same data"}


def test_select_limits_the_comparison(mlp):
    a = mlp.state_dict()
    b = {k: v + 1 for k, v in a.items()}
    d = weightsmith.diff(a, b, select="*.bias")
    assert [t.key for t in d.tensors] == ["0.bias", "2.bias"]
    with pytest.raises(SelectorError):
        weightsmith.diff(a, b, select="nothing.here")


def test_rollups_fold_layer_indices_and_group_top_level_modules():
    torch.manual_seed(0)
    a = {f"blocks.{i}.{p}.weight": torch.randn(4, 4) for i in range(3) for p in ("attn", "mlp")}
    a["head.weight"] = torch.randn(2, 4)
    b = {k: (v + 1 if ".mlp." in k else v) for k, v in a.items()}
    d = weightsmith.diff(a, b)
    layers = {r.name: r for r in d.layers}
    assert set(layers) == {"blocks.#.attn.weight", "blocks.#.mlp.weight", "head.weight"}
    assert (layers["blocks.#.mlp.weight"].tensors, layers["blocks.#.mlp.weight"].changed_tensors) == (3, 3)
    assert layers["blocks.#.attn.weight"].changed_tensors == 0
    modules = {r.name: r for r in d.modules}
    assert (modules["blocks"].tensors, modules["blocks"].changed_tensors) == (6, 3)
    assert modules["blocks"].changed_fraction == 0.5


def test_rendering_lists_keys_changes_and_top_tensors(mlp):
    a = mlp.state_dict()
    b = {k: v * (2.0 if k.endswith("weight") else 1.0) for k, v in a.items() if k != "2.bias"}
    b["extra"] = torch.zeros(1)
    d = weightsmith.diff(a, b)
    d.top = 1
    text = str(d)
    first = text.splitlines()[0]
    assert first == "different: 2 of 3 compared tensors changed, 1 only in a, 1 only in b"
    assert "only in a (1): 2.bias" in text and "only in b (1): extra" in text
    assert "most changed tensors (1 of 2 not identical)" in text
    data = d.to_dict()
    assert data["schema"] == "weightsmith.diff/1" and data["equal"] is False
    assert {t["key"] for t in data["tensors"]} == {"0.weight", "0.bias", "2.weight"}


def test_bad_options_are_listed_together(mlp):
    with pytest.raises(UsageError) as e:
        weightsmith.diff(mlp, mlp, atol=-1, rtol="x", rename=[(("a", "b"), "c", "cat(0)")])
    text = str(e.value)
    assert "atol" in text and "rtol" in text and "not one-to-one" in text


def test_missing_files_raise_not_found(tmp_path, mlp):
    with pytest.raises(CheckpointNotFoundError) as e:
        weightsmith.diff(tmp_path / "nope.safetensors", tmp_path / "nada.pt")
    assert "nope.safetensors" in str(e.value) and "nada.pt" in str(e.value)


def test_progress_reaches_the_total(tmp_path, mlp, mlp_file):
    calls = []
    weightsmith.diff(mlp_file, mlp_file, progress=lambda d, t, k: calls.append((d, t)))
    assert calls and calls[-1][0] == calls[-1][1] == 2 * sum(v.nbytes for v in mlp.state_dict().values())


def test_checksums_of_shards_and_tied_keys_are_used(tmp_path, tied_mlp, monkeypatch):
    weightsmith.save(tied_mlp, tmp_path / "sharded", max_shard_size=200)
    weightsmith.save(tied_mlp, tmp_path / "single.safetensors")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    monkeypatch.setattr(diff_module, "_measure_pair", lambda *a: pytest.fail(f"read {a[3]}"))
    d = weightsmith.diff(tmp_path / "sharded", tmp_path / "single.safetensors")
    assert d.equal and len(d.tensors) == 8
    assert {t.method for t in d.tensors} == {"checksum"}
