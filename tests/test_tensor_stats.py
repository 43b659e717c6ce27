"""`stats`: one chunked pass per tensor, accurate against a float64 reference (S5)."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import weightsmith
from weightsmith.errors import SelectorError
from weightsmith.tensor_stats import StatsReport, TensorStats, stats
from _one_rank import one_rank_mesh


def reference(t):
    """mean, population std, l2 over the finite values, in float64."""
    x = t.detach().double().flatten()
    x = x[torch.isfinite(x)]
    return x.mean().item(), x.std(correction=0).item(), x.norm().item()


def rel(a, b):
    return abs(a - b) / abs(b)


class FakeInfo:
    def __init__(self, t, storage=None):
        self.shape, self.dtype = tuple(t.shape), str(t.dtype).removeprefix("torch.")
        self.numel, self.nbytes, self.storage = t.numel(), t.numel() * t.element_size(), storage


class FakeCheckpoint(dict):
    path = "fake.safetensors"

    def __init__(self, tensors, storages=None):
        storages = storages or {}
        super().__init__({k: FakeInfo(t, storages.get(k)) for k, t in tensors.items()})
        self._tensors, self.loaded = tensors, []

    def tensor(self, key):
        self.loaded.append(key)
        return self._tensors[key]


def test_small_spread_on_a_large_mean_keeps_its_std():
    torch.manual_seed(0)
    x = torch.randn(2_000_000) * 1e-3 + 1.0
    mean, std, l2 = reference(x)
    naive = math.sqrt((x * x).sum().item() / x.numel() - x.mean().item() ** 2)
    assert rel(naive, std) > 1e-2  # the trap: float32 sums of squares lose the spread
    for chunk in (1 << 16, 1 << 22):  # many chunks, and one
        s = stats(x, chunk_bytes=chunk)[""]
        assert rel(s.std, std) < 1e-3
        assert rel(s.mean, mean) < 1e-6 and rel(s.l2, l2) < 1e-6
        assert (s.min, s.max) == (x.min().item(), x.max().item())


def test_chunks_with_different_means_combine_exactly():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(100_000) + 5, torch.randn(100_000) * 3 - 2, torch.rand(77_777)])
    mean, std, l2 = reference(x)
    s = stats(x, chunk_bytes=40_000)[""]
    assert rel(s.mean, mean) < 1e-6 and rel(s.std, std) < 1e-6 and rel(s.l2, l2) < 1e-6
    assert s.numel == x.numel()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_match_float64(dtype):
    torch.manual_seed(0)
    x = (torch.randn(300_001) * 2 + 0.5).to(dtype)
    mean, std, l2 = reference(x)
    s = stats({"x": x}, chunk_bytes=1 << 18)["x"]
    assert s.dtype == str(dtype).removeprefix("torch.")
    assert rel(s.mean, mean) < 1e-5 and rel(s.std, std) < 1e-5 and rel(s.l2, l2) < 1e-5
    assert s.min == x.min().item() and s.absmax == x.abs().max().item()


def test_nan_and_inf_are_counted_and_left_out_of_the_moments():
    x = torch.randn(10_000)
    x[[3, 500, 9000]] = float("nan")
    x[[7, 8]] = float("inf")
    x[20] = -float("inf")
    x[100:150] = 0.0
    s = stats(x, chunk_bytes=4096)[""]
    assert (s.nan_count, s.inf_count) == (3, 3)
    assert s.zero_fraction == 50 / 10_000
    mean, std, _ = reference(x)
    assert rel(s.mean, mean) < 1e-6 and rel(s.std, std) < 1e-6
    finite = x[torch.isfinite(x)]
    assert (s.min, s.max) == (finite.min().item(), finite.max().item())
    assert not s.finite


def test_float16_overflowing_sum_is_not_mistaken_for_inf():
    x = torch.full((100_000,), 60_000.0, dtype=torch.float16)  # sums past float16's range
    x[0] = 0
    s = stats(x)[""]
    assert (s.nan_count, s.inf_count) == (0, 0)
    assert s.max == 60_000.0 and s.zero_fraction == 1 / 100_000


def test_constant_and_zero_tensors():
    r = stats({"c": torch.full((3_000_000,), 0.1), "z": torch.zeros(5, 5)}, chunk_bytes=1 << 20)
    assert r["c"].std == 0.0 and r["c"].min == r["c"].max == pytest.approx(0.1)
    assert r["z"].zero_fraction == 1.0 and r["z"].absmax == 0.0 and r["z"].l2 == 0.0


def test_non_contiguous_tensors_match_reference():
    torch.manual_seed(0)
    base = torch.randn(300, 500) + 2
    for t in (base.t(), base[:, ::3], base.t()[::2], base.expand(2, 300, 500)):
        mean, std, l2 = reference(t)
        s = stats(t, chunk_bytes=4_000)[""]
        assert s.numel == t.numel() and s.shape == tuple(t.shape)
        assert rel(s.mean, mean) < 1e-6 and rel(s.std, std) < 1e-5 and rel(s.l2, l2) < 1e-6


def test_integer_bool_complex_and_empty_tensors():
    r = stats({"i": torch.arange(10), "b": torch.tensor([True, False, False, True]),
               "c": torch.tensor([3 + 4j, 0j]), "e": torch.empty(0, 3)})
    assert (r["i"].mean, r["i"].max, r["i"].zero_fraction) == (4.5, 9.0, 0.1)
    assert (r["b"].mean, r["b"].zero_fraction) == (0.5, 0.5)
    assert (r["c"].l2, r["c"].numel) == (5.0, 2)  # over the real and imaginary parts
    assert r["e"].numel == 0 and math.isnan(r["e"].mean) and math.isnan(r["e"].zero_fraction)


def test_module_parameters_and_buffers_tied_measured_once(tied_mlp):
    model = nn.Sequential(tied_mlp, nn.BatchNorm1d(1))
    r = stats(model)
    names = [s.key for s in r]
    assert "1.running_var" in names and "1.num_batches_tracked" in names
    assert "0.1.weight" in names and "0.3.weight" not in names
    assert r.aliases == {"0.3.weight": "0.1.weight", "0.3.bias": "0.1.bias"}
    assert r["0.3.weight"] is r["0.1.weight"]
    w = tied_mlp[1].weight
    assert r["0.1.weight"].mean == pytest.approx(w.double().mean().item(), rel=1e-6)
    assert r["1.running_var"].mean == 1.0
    assert w.requires_grad  # measuring leaves the model as it was


def test_results_do_not_depend_on_the_number_of_workers():
    torch.manual_seed(0)
    sd = {f"t{i}": torch.randn(50_000 + i) * (i + 1) + i for i in range(6)}
    sd["bf"] = torch.randn(70_000).to(torch.bfloat16)
    runs = [stats(sd, chunk_bytes=16_384, workers=w).to_dict() for w in (1, 2, 3)]
    assert runs[0] == runs[1] == runs[2]  # chunks are combined in one fixed order


def test_select_narrows_and_bad_options_raise(mlp):
    r = stats(mlp, select="*.bias")
    assert [s.key for s in r] == ["0.bias", "2.bias"]
    with pytest.raises(SelectorError, match="matched nothing"):
        stats(mlp, select="nope.*")
    with pytest.raises(ValueError, match="chunk_bytes.*workers.*progress must be callable"):
        stats(mlp, chunk_bytes=0, workers=0, progress=3)
    with pytest.raises(TypeError, match="'step' is int"):
        stats({"w": torch.ones(1), "step": 3})


def test_checkpoint_streams_tensor_by_tensor_with_progress():
    torch.manual_seed(0)
    a = torch.randn(1000)
    tensors = {"a": a, "b": torch.randn(20, 30).to(torch.bfloat16), "a_alias": a,
               "c": torch.ones(3)}
    ckpt = FakeCheckpoint(tensors, storages={"a": "0", "a_alias": "0"})
    calls = []
    r = stats(ckpt, chunk_bytes=1024, progress=lambda *call: calls.append(call))
    assert ckpt.loaded == ["a", "b", "c"]  # one at a time, in order; the tie never loaded
    assert r.source == "fake.safetensors" and r.aliases == {"a_alias": "a"}
    total = 4000 + 1200 + 12
    assert r.nbytes == total
    assert calls[-1] == (total, total, "c")
    assert [d for d, _, _ in calls] == sorted(d for d, _, _ in calls)
    assert len([c for c in calls if c[2] == "a"]) == 4  # 4000 bytes in 1 KiB chunks
    assert r["b"].mean == pytest.approx(tensors["b"].double().mean().item(), rel=1e-6)


def test_real_safetensors_file(tmp_path, mlp):
    path = tmp_path / "mlp.safetensors"
    save_file(mlp.state_dict(), str(path))
    r = stats(weightsmith.open(path))
    assert sorted(s.key for s in r) == sorted(mlp.state_dict())
    assert r["2.weight"].max == mlp[2].weight.max().item()


def test_meta_tensors_are_skipped_with_a_reason():
    with torch.device("meta"):
        model = nn.Linear(3, 3)
    r = stats(model)
    assert len(r) == 0 and r.skipped == {"weight": "meta tensor: no data",
                                         "bias": "meta tensor: no data"}


def test_report_renders_and_serializes():
    r = stats({"w": torch.tensor([1.0, float("nan"), -2.0])})
    assert isinstance(r, StatsReport)
    text = str(r)
    assert "w" in text and "-0.5 ± 1.5" in text
    data = json.loads(r.to_json())
    assert data["schema"] == "weightsmith.stats/1"
    assert data["tensors"][0]["nan_count"] == 1 and data["tensors"][0]["mean"] == -0.5


def test_a_sharded_dtensor_without_its_process_group_is_skipped_and_a_whole_one_measured():
    """With the ranks gone, a shard alone says nothing of its tensor (with them: tests/dist)."""
    with one_rank_mesh() as mesh:
        from torch.distributed.tensor import DTensor, Replicate, Shard

        whole = torch.arange(8.0).reshape(2, 4)
        sd = {"whole": DTensor.from_local(whole, mesh, [Replicate()]),
              # this rank holds half of a (4, 4) tensor, as one of two ranks would
              "half": DTensor.from_local(whole.clone(), mesh, [Shard(0)], run_check=False,
                                         shape=torch.Size([4, 4]), stride=(4, 1))}
    r = stats(sd)
    assert r["whole"].mean == 3.5 and r["whole"].shape == (2, 4)
    assert list(r.skipped) == ["half"] and "without a process group" in r.skipped["half"]


def test_device_branch_agrees_with_the_cpu_one():
    # tensors off the CPU are measured with torch ops instead of numpy: same contributions
    from weightsmith._measure import moments
    from weightsmith.tensor_stats import _as_numpy, _Scratch, _torch_chunk

    torch.manual_seed(0)
    shifted = torch.randn(5000) * 1e-3 + 1  # mean-dominated: takes the shifted path
    broken = torch.randn(5000)
    broken[[1, 2]], broken[3], broken[10:20] = float("nan"), float("inf"), 0.0
    scratch = _Scratch()
    for w in (shifted, broken, torch.full((9,), 2.0), torch.randn(777).to(torch.bfloat16)):
        on_device = _torch_chunk(w, scratch)
        on_cpu = moments(_as_numpy(w, scratch), scratch)
        assert on_device[:1] == on_cpu[:1] and on_device[3:] == on_cpu[3:]  # counts, min, max
        assert on_device.mean == pytest.approx(on_cpu.mean, rel=1e-6, abs=1e-9)
        assert on_device.m2 == pytest.approx(on_cpu.m2, rel=1e-4)


def test_public_names_resolve():
    assert weightsmith.stats is stats and weightsmith.StatsReport is StatsReport
    assert weightsmith.TensorStats is TensorStats


def test_stats_check_and_summary_take_a_path(tmp_path):
    import weightsmith

    weightsmith.save({"w": torch.tensor([1.0, float("nan")])}, tmp_path / "bad.safetensors")
    assert weightsmith.stats(tmp_path / "bad.safetensors").tensors[0].nan_count == 1
    report = weightsmith.check(str(tmp_path / "bad.safetensors"))
    assert not report.ok
    assert weightsmith.summary(tmp_path / "bad.safetensors").totals.all == 2


def test_a_files_pages_are_dropped_piece_by_piece_once_measured(tmp_path, monkeypatch):
    """Streaming through a large file keeps only the pieces in flight resident: every byte of
    every tensor's data is handed back to the kernel once, right after it is measured."""
    from safetensors.torch import save_file

    from weightsmith.io import _arrays

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(300, 700), "b": torch.randn(5000), "c": torch.randn(64, 64).bfloat16()}, str(path))
    dropped: list[tuple[int, int]] = []
    real = _arrays.release_pages
    monkeypatch.setattr(_arrays, "release_pages", lambda buf, offset, n: (dropped.append((offset, n)),
                                                                          real(buf, offset, n))[1])
    report = weightsmith.stats(path, chunk_bytes=64 * 1024)
    ckpt = weightsmith.open(path)
    spans = sorted(ckpt.reader.data_span(k)[:2] for k in ckpt)  # (offset, nbytes) of each tensor's data
    pieces = list(dropped)
    for span in spans:  # each tensor's whole span is also dropped once it is done: set those apart
        pieces.remove(span)
    pieces.sort()
    assert len(pieces) > len(spans)  # piece by piece, as each is measured
    assert sum(n for _, n in pieces) == sum(n for _, n in spans)
    assert pieces[0][0] == spans[0][0] and sum(pieces[-1]) == sum(spans[-1])
    assert {t.key for t in report.tensors} == {"a", "b", "c"}
