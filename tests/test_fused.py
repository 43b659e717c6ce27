"""The compiled single-pass comparison gives the numbers of a float64 reference and of the numpy
kernel, and `diff` picks it by size or by ``WEIGHTSMITH_KERNEL``."""

import math
import os

import numpy as np
import pytest
import torch

import weightsmith
from weightsmith import _measure
from weightsmith.errors import UsageError

try:
    from weightsmith import _fused
except ImportError:  # the `fast` extra is part of the test install; CI must not skip silently
    if os.environ.get("CI"):
        raise
    pytest.skip("numba is not installed (pip install 'weightsmith[fast]')", allow_module_level=True)


def reference(a: np.ndarray, b: np.ndarray, atol: float = 0.0, rtol: float = 0.0) -> tuple:
    """The six results in float64, one quantity at a time."""
    d = (a - b).astype(np.float64)  # the difference in the working dtype, as both kernels take it
    wa, wb = a.astype(np.float64), b.astype(np.float64)
    changed = int(np.count_nonzero(np.abs(d) > atol + rtol * np.abs(wa)))
    return float(d @ d), float(wa @ wa), float(wb @ wb), float(wa @ wb), float(np.abs(d).max()), changed


def pair(n: int, dtype, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n).astype(dtype)
    b = (a + 1e-3 * rng.standard_normal(n)).astype(dtype)
    b[::7] = a[::7]  # some unchanged elements, so the count is not simply n
    return a, b


def fused(a, b, atol=0.0, rtol=0.0):
    return _fused.compare(a, b, np.empty(_fused.BLOCK, a.dtype), atol, rtol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, _fused.BLOCK - 1, _fused.BLOCK, _fused.BLOCK + 1, 5 * _fused.BLOCK + 123])
@pytest.mark.parametrize("tol", [(0.0, 0.0), (1e-3, 0.0), (1e-4, 1e-3)])
def test_compiled_kernel_matches_a_float64_reference(dtype, n, tol):
    a, b = pair(n, dtype, seed=n)
    got, want = fused(a, b, *tol), reference(a, b, *tol)
    assert got[:4] == pytest.approx(want[:4], rel=1e-12, abs=1e-300)
    assert got[4] == want[4]  # the largest difference is exact
    assert got[5] == want[5]


def test_equal_and_signed_zero_pairs_count_nothing():
    a = np.array([0.0, -0.0, 1.5, -2.0], np.float32)
    b = np.array([-0.0, 0.0, 1.5, -2.0], np.float32)
    assert fused(a, b) == (0.0, 6.25, 6.25, 6.25, 0.0, 0)


def test_nan_or_inf_makes_the_sums_non_finite_so_the_caller_falls_back():
    a, b = pair(3 * _fused.BLOCK, np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        x = a.copy()
        x[_fused.BLOCK + 5] = bad
        dd, aa, *_ = fused(x, b)
        assert not (math.isfinite(dd) and math.isfinite(aa))


def test_numpy_kernel_agrees_to_float32_rounding():
    a, b = pair(200_000, np.float32)
    part = _measure.compare(a, b, 0.0, 0.0, _measure.Scratch())
    got = fused(a, b)
    assert (part.max_abs, part.changed) == (got[4], got[5])
    assert part.dd == pytest.approx(got[0], rel=1e-5)
    assert part.ab == pytest.approx(got[3], rel=1e-5)


def _pairs(tmp_path):
    torch.manual_seed(0)
    a = {"w": torch.randn(300, 70), "t": torch.randn(64, 50).t(), "h": torch.randn(3000).to(torch.bfloat16),
         "d": torch.randn(999, dtype=torch.float64), "bad": torch.randn(5000)}
    b = {"w": a["w"] + 1e-3 * torch.randn(300, 70), "t": a["t"].contiguous() * 1.5,
         "h": (a["h"].float() + 0.25).to(torch.bfloat16), "d": a["d"] * (1 + 1e-9), "bad": a["bad"].clone()}
    a["bad"][17], b["bad"][4000] = float("nan"), float("inf")
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    return tmp_path / "a.pt", tmp_path / "b.pt"


@pytest.mark.parametrize("tol", [{}, {"atol": 1e-4}, {"rtol": 1e-3}])
def test_diff_gives_the_same_numbers_with_either_kernel(tmp_path, monkeypatch, tol):
    a, b = _pairs(tmp_path)
    results = {}
    for kernel in ("numpy", "compiled"):
        monkeypatch.setenv(_measure.KERNEL_ENV, kernel)
        results[kernel] = {t.key: t for t in weightsmith.diff(a, b, **tol).tensors}
    assert results["numpy"].keys() == results["compiled"].keys() == {"w", "t", "h", "d", "bad"}
    for key, x in results["numpy"].items():
        y = results["compiled"][key]
        assert (x.changed, x.nan_a, x.nan_b, x.identical) == (y.changed, y.nan_a, y.nan_b, y.identical), key
        assert x.max_abs == y.max_abs, key
        assert x.rel_l2 == pytest.approx(y.rel_l2, rel=1e-5), key
        assert x.cosine == pytest.approx(y.cosine, abs=1e-6), key
    assert results["compiled"]["bad"].nan_a == 1 and results["compiled"]["bad"].changed == 2


def test_the_kernel_is_chosen_by_size_unless_told(monkeypatch):
    monkeypatch.delenv(_measure.KERNEL_ENV, raising=False)
    monkeypatch.setattr(_measure, "_fused", None)  # not loaded yet
    assert not _measure.fused_wanted(_measure.FUSED_MIN_BYTES - 1)
    assert _measure.fused_wanted(_measure.FUSED_MIN_BYTES)
    assert _measure.fused_wanted(1)  # the line above loaded it: from now on it costs nothing
    monkeypatch.setenv(_measure.KERNEL_ENV, "numpy")
    assert not _measure.fused_wanted(10 * _measure.FUSED_MIN_BYTES)
    monkeypatch.setenv(_measure.KERNEL_ENV, "fastest")
    with pytest.raises(UsageError, match="WEIGHTSMITH_KERNEL='fastest'"):
        _measure.fused_wanted(1)


def test_asking_for_the_compiled_kernel_without_numba_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(_measure, "_fused", False)  # as when numba failed to import
    monkeypatch.setenv(_measure.KERNEL_ENV, "compiled")
    with pytest.raises(UsageError, match=r"weightsmith\[fast\]"):
        _measure.fused_wanted(1)
    monkeypatch.setenv(_measure.KERNEL_ENV, "auto")
    assert not _measure.fused_wanted(10 * _measure.FUSED_MIN_BYTES)


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x.astype(np.float32)).bfloat16().view(torch.int16).numpy()


@pytest.mark.parametrize("n", [1, _fused.BLOCK + 1, 3 * _fused.BLOCK + 77])
@pytest.mark.parametrize("tol", [(0.0, 0.0), (1e-2, 0.0), (1e-3, 1e-2)])
def test_bfloat16_kernel_matches_the_reference_on_widened_values(n, tol):
    a, b = pair(n, np.float32, seed=n)
    b = a + np.float32(0.05) * (b - a) / np.float32(1e-3)  # differences bfloat16 can hold
    bits_a, bits_b = bfloat16_bits(a), bfloat16_bits(b)
    wide_a = torch.from_numpy(bits_a).view(torch.bfloat16).float().numpy()
    wide_b = torch.from_numpy(bits_b).view(torch.bfloat16).float().numpy()
    got = _fused.compare_bfloat16(bits_a, bits_b, np.empty(3 * _fused.BLOCK, np.float32), *tol)
    want = reference(wide_a, wide_b, *tol)
    assert got[:4] == pytest.approx(want[:4], rel=1e-12, abs=1e-300)
    assert got[4:] == want[4:]
    assert 0 < got[5] < n or n == 1


def test_bfloat16_with_a_nan_falls_back_to_the_numpy_kernel():
    _measure.fused_available()
    a = bfloat16_bits(np.arange(100, dtype=np.float32))
    b = a.copy()
    b[50] = bfloat16_bits(np.array([np.nan], np.float32))[0]
    assert _measure.compare_bfloat16(a, b, 0.0, 0.0, _measure.Scratch()) is None
    assert _measure.compare_bfloat16(a, a, 0.0, 0.0, _measure.Scratch()).changed == 0


# -- moments (stats) ---------------------------------------------------------------------------
def moments_reference(x: np.ndarray) -> tuple:
    w = x.astype(np.float64)
    return len(w), w.mean(), float(((w - w.mean()) ** 2).sum()), float(w.min()), float(w.max()), int((w == 0).sum())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 7, _fused.MOMENTS_BLOCK, _fused.MOMENTS_BLOCK + 1, 3 * _fused.MOMENTS_BLOCK + 5])
def test_compiled_moments_match_a_float64_reference(dtype, n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 3 - 1).astype(dtype)
    x[::9] = 0
    x[1::11] = -0.0
    got, want = _fused.moments(x), moments_reference(x)
    assert got[0] == want[0] and got[3:] == want[3:]  # count, min, max, zeros exact
    assert got[1:3] == pytest.approx(want[1:3], rel=1e-12, abs=1e-12)


def test_compiled_moments_of_a_constant_have_no_spread_and_a_nan_falls_back():
    assert _fused.moments(np.full(3 * _fused.MOMENTS_BLOCK, 0.1, np.float32))[2] == 0.0
    x = np.ones(2 * _fused.MOMENTS_BLOCK, np.float32)
    for bad in (np.nan, np.inf):
        x[_fused.MOMENTS_BLOCK + 3] = bad
        assert _fused.moments(x) is None


def test_compiled_moments_of_bfloat16_bits():
    x = (np.random.default_rng(3).standard_normal(2 * _fused.MOMENTS_BLOCK + 9) * 2 - 0.5).astype(np.float32)
    bits = bfloat16_bits(x)
    wide = torch.from_numpy(bits).view(torch.bfloat16).float().numpy()
    got = _fused.moments_bfloat16(bits, np.empty(_fused.MOMENTS_BLOCK, np.float32))
    want = moments_reference(wide)
    assert got[0] == want[0] and got[3:] == want[3:]
    assert got[1:3] == pytest.approx(want[1:3], rel=1e-12)


def test_stats_give_the_same_numbers_with_either_kernel(tmp_path, monkeypatch):
    a, _ = _pairs(tmp_path)
    results = {}
    for kernel in ("numpy", "compiled"):
        monkeypatch.setenv(_measure.KERNEL_ENV, kernel)
        results[kernel] = {t.key: t for t in weightsmith.stats(a, chunk_bytes=4096).tensors}
    assert results["numpy"].keys() == results["compiled"].keys() == {"w", "t", "h", "d", "bad"}
    for key, x in results["numpy"].items():
        y = results["compiled"][key]
        assert (x.numel, x.min, x.max, x.nan_count, x.inf_count, x.zero_fraction) == \
               (y.numel, y.min, y.max, y.nan_count, y.inf_count, y.zero_fraction), key
        assert x.mean == pytest.approx(y.mean, rel=1e-5, abs=1e-7), key
        assert x.std == pytest.approx(y.std, rel=1e-5), key
    assert results["compiled"]["bad"].nan_count == 1
