"""Single-pass kernels compiled with numba (the ``fast`` extra): two arrays compared, one measured.

numpy makes one pass per quantity (difference, sums, min, max, counts) and holds the GIL
between them, so a second thread gains nothing. These kernels read each element once (a
second pass, where one is needed, runs over a block still in cache), keep sums in float64 and
run without the GIL, so the threads of `diff` and `stats` run on separate cores. Importing
this module raises ImportError when numba is not installed; callers fall back to the numpy
kernel in `_measure`, which gives the same results to float32 rounding.

Sums are reassociated into SIMD lanes (``reassoc``), which keeps NaN and Inf propagating, so a
non-finite sum still signals a NaN or Inf in the data (the caller then measures it another
way). Extremes and counts are taken from the bits of the values: with the sign bit cleared an
IEEE float orders as an unsigned integer (with a negative's other bits flipped, as a signed
one), and integer extremes vectorize where float ones may not.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

__all__ = ["BLOCK", "MOMENTS_BLOCK", "compare", "compare_bfloat16", "moments", "moments_bfloat16"]

# reassociation lets the float64 sums run in SIMD lanes; no flag assumes finite values
_FAST = {"reassoc", "contract"}
# elements per inner block: the block's difference stays in the L1 cache for the count
BLOCK = 8192


@numba.njit(nogil=True, fastmath=_FAST, cache=True, boundscheck=False, inline="always")
def _sums(a, b, d):  # type: ignore[no-untyped-def]
    dd = aa = bb = ab = 0.0
    for i in range(a.size):
        x = a[i]
        y = b[i]
        z = x - y
        d[i] = z
        fx, fy, fz = np.float64(x), np.float64(y), np.float64(z)
        dd += fz * fz
        aa += fx * fx
        bb += fy * fy
        ab += fx * fy
    return dd, aa, bb, ab


@numba.njit(nogil=True, fastmath=_FAST, cache=True, boundscheck=False, inline="always")
def _largest(bits, mask):  # type: ignore[no-untyped-def]
    """The largest |d| (as bits) and the count of nonzero d over the bits of a block of d."""
    top = mask ^ mask
    nonzero = 0
    for i in range(bits.size):
        u = bits[i] & mask
        top = max(top, u)
        nonzero += np.int64(u != 0)
    return top, nonzero


@numba.njit(nogil=True, fastmath=_FAST, cache=True, boundscheck=False, inline="always")
def _beyond(d, a, atol, rtol):  # type: ignore[no-untyped-def]
    """How many |d| exceed ``atol + rtol * |a|``, compared in float64."""
    count = 0
    for i in range(d.size):
        count += np.int64(abs(np.float64(d[i])) > atol + rtol * abs(np.float64(a[i])))
    return count


@numba.njit(nogil=True, fastmath=_FAST, cache=True, boundscheck=False, inline="always")
def _block(a, b, d, bits, mask, atol, rtol):  # type: ignore[no-untyped-def]
    """One block's six results: its sums, the largest |d| (as bits) and the changed count."""
    dd, aa, bb, ab = _sums(a, b, d)
    top, nonzero = _largest(bits, mask)
    changed = nonzero if atol == 0.0 and rtol == 0.0 else _beyond(d, a, atol, rtol)
    return dd, aa, bb, ab, top, changed


@numba.njit(nogil=True, fastmath=_FAST, cache=True, boundscheck=False)
def _compare(a, b, d, bits, mask, atol, rtol):  # type: ignore[no-untyped-def]
    dd = aa = bb = ab = 0.0
    top = mask ^ mask
    changed = 0
    n = a.size
    for start in range(0, n, BLOCK):
        m = min(n, start + BLOCK) - start
        r = _block(a[start:start + m], b[start:start + m], d[:m], bits[:m], mask, atol, rtol)
        dd, aa, bb, ab = dd + r[0], aa + r[1], bb + r[2], ab + r[3]
        top = max(top, r[4])
        changed += r[5]
    return dd, aa, bb, ab, top, changed


@numba.njit(nogil=True, fastmath=_FAST, cache=True, boundscheck=False)
def _compare_bfloat16(a, b, wa, wb, d, atol, rtol):  # type: ignore[no-untyped-def]
    """As `_compare` for bfloat16 bits (uint16), each block widened to float32 (its top half)."""
    dd = aa = bb = ab = 0.0
    mask = np.uint32(0x7FFF_FFFF)
    top = np.uint32(0)
    changed = 0
    fa, fb, bits = wa.view(np.float32), wb.view(np.float32), d.view(np.uint32)
    n = a.size
    for start in range(0, n, BLOCK):
        m = min(n, start + BLOCK) - start
        for i in range(m):
            wa[i] = np.uint32(a[start + i]) << 16
            wb[i] = np.uint32(b[start + i]) << 16
        r = _block(fa[:m], fb[:m], d[:m], bits[:m], mask, atol, rtol)
        dd, aa, bb, ab = dd + r[0], aa + r[1], bb + r[2], ab + r[3]
        top = max(top, r[4])
        changed += r[5]
    return dd, aa, bb, ab, top, changed


_MASKS = {np.dtype(np.float32): (np.uint32, np.uint32(0x7FFF_FFFF)),
          np.dtype(np.float64): (np.uint64, np.uint64(0x7FFF_FFFF_FFFF_FFFF))}


def compare(a: np.ndarray, b: np.ndarray, scratch: np.ndarray, atol: float, rtol: float
            ) -> tuple[float, float, float, float, float, int]:
    """``(sum d², sum a², sum b², sum a·b, max |d|, changed)`` for two contiguous 1-D arrays of
    one dtype (float32 or float64), with ``d = a - b`` in that dtype. ``scratch`` is a buffer of
    the same dtype and at least ``BLOCK`` elements. Non-finite data makes the sums non-finite;
    the other results are then meaningless and the caller measures the pair another way.
    """
    unsigned, mask = _MASKS[a.dtype]
    dd, aa, bb, ab, top, changed = _compare(a, b, scratch, scratch.view(unsigned), mask, float(atol), float(rtol))
    largest = float(np.array([top], dtype=unsigned).view(a.dtype)[0])
    return float(dd), float(aa), float(bb), float(ab), largest, int(changed)


def compare_bfloat16(a: np.ndarray, b: np.ndarray, scratch: np.ndarray, atol: float, rtol: float
                     ) -> tuple[float, float, float, float, float, int]:
    """`compare` for two contiguous 1-D arrays of bfloat16 bits (uint16 or int16), measured as
    float32; ``scratch`` is a float32 buffer of at least ``3 * BLOCK`` elements."""
    wa, wb, d = scratch[:BLOCK].view(np.uint32), scratch[BLOCK:2 * BLOCK].view(np.uint32), scratch[2 * BLOCK:3 * BLOCK]
    dd, aa, bb, ab, top, changed = _compare_bfloat16(a.view(np.uint16), b.view(np.uint16), wa, wb, d,
                                                     float(atol), float(rtol))
    largest = float(np.array([top], dtype=np.uint32).view(np.float32)[0])
    return float(dd), float(aa), float(bb), float(ab), largest, int(changed)




# -- moments of one array (`stats`) ------------------------------------------------------------
# elements per block of `_moments`: two passes over it, the second from a core's own (L2) cache
MOMENTS_BLOCK = 1 << 16


@numba.njit(nogil=True, fastmath=_FAST, cache=True, boundscheck=False, inline="always")
def _block_moments(x, bits, shift, low):  # type: ignore[no-untyped-def]
    """One block's sum, lowest and highest order keys and zeros in one pass; then, while the
    block is in cache, its mean and squared deviations from it (exactly 0 for a constant block).

    ``bits`` are ``x`` as signed integers, ``shift`` their width less one and ``low`` every bit
    but the sign: with the low bits of negatives flipped, the integers order as the floats do.
    """
    s = 0.0
    lo, hi = low, ~low
    zeros = 0
    for i in range(x.size):
        s += np.float64(x[i])
        v = bits[i]
        key = v ^ ((v >> shift) & low)
        lo = min(lo, key)
        hi = max(hi, key)
        zeros += np.int64((v & low) == 0)
    if lo == hi:
        return s, lo, hi, zeros, np.float64(x[0]), 0.0
    mean = s / x.size
    m2 = 0.0
    for i in range(x.size):
        d = np.float64(x[i]) - mean
        m2 += d * d
    return s, lo, hi, zeros, mean, m2


@numba.njit(nogil=True, fastmath=_FAST, cache=True, boundscheck=False, inline="always")
def _fold(n, mean, m2, m, block_mean, block_m2):  # type: ignore[no-untyped-def]
    """Chan et al.'s update: the moments of ``n`` values and of a block of ``m``, as one."""
    total = n + m
    delta = block_mean - mean
    return total, mean + delta * m / total, m2 + block_m2 + delta * delta * (np.float64(n) * m / total)


@numba.njit(nogil=True, fastmath=_FAST, cache=True, boundscheck=False)
def _moments(x, bits, shift, low):  # type: ignore[no-untyped-def]
    n, mean, m2 = 0, 0.0, 0.0
    lo, hi = low, ~low
    zeros = 0
    size = x.size
    for start in range(0, size, MOMENTS_BLOCK):
        stop = min(size, start + MOMENTS_BLOCK)
        s, blo, bhi, z, bmean, bm2 = _block_moments(x[start:stop], bits[start:stop], shift, low)
        if not np.isfinite(s):  # a NaN or Inf: the caller measures the array another way
            return n, mean, m2, lo, hi, zeros, False
        n, mean, m2 = _fold(n, mean, m2, stop - start, bmean, bm2)
        lo, hi, zeros = min(lo, blo), max(hi, bhi), zeros + z
    return n, mean, m2, lo, hi, zeros, True


@numba.njit(nogil=True, fastmath=_FAST, cache=True, boundscheck=False)
def _moments_bfloat16(a, wide):  # type: ignore[no-untyped-def]
    """As `_moments` for bfloat16 bits (uint16), each block widened to float32 first."""
    shift, low = np.int32(31), np.int32(0x7FFF_FFFF)
    n, mean, m2 = 0, 0.0, 0.0
    lo, hi = low, ~low
    zeros = 0
    x = wide.view(np.float32)
    size = a.size
    for start in range(0, size, MOMENTS_BLOCK):
        m = min(size, start + MOMENTS_BLOCK) - start
        for i in range(m):
            wide[i] = np.int32(a[start + i]) << 16
        s, blo, bhi, z, bmean, bm2 = _block_moments(x[:m], wide[:m], shift, low)
        if not np.isfinite(s):
            return n, mean, m2, lo, hi, zeros, False
        n, mean, m2 = _fold(n, mean, m2, m, bmean, bm2)
        lo, hi, zeros = min(lo, blo), max(hi, bhi), zeros + z
    return n, mean, m2, lo, hi, zeros, True


_SIGNED = {np.dtype(np.float32): (np.int32, np.int32(31), np.int32(0x7FFF_FFFF)),
           np.dtype(np.float64): (np.int64, np.int64(63), np.int64(0x7FFF_FFFF_FFFF_FFFF))}

Moments = tuple[int, float, float, float, float, int]


def _value(key: int, dtype: Any) -> float:
    """The float whose order key is ``key`` (the key's own inverse gives its bits)."""
    signed, shift, low = _SIGNED[np.dtype(dtype)]
    bits = np.array([key], dtype=signed)
    return float((bits ^ ((bits >> shift) & low)).view(dtype)[0])


def _result(out: tuple[Any, ...], dtype: Any) -> Moments | None:
    n, mean, m2, lo, hi, zeros, finite = out
    if not finite:
        return None
    return int(n), float(mean), max(float(m2), 0.0), _value(int(lo), dtype), _value(int(hi), dtype), int(zeros)


def moments(a: np.ndarray) -> Moments | None:
    """``(n, mean, sum of squared deviations, min, max, zeros)`` of a contiguous 1-D float32 or
    float64 array, or ``None`` when it holds a NaN or Inf (measure it another way)."""
    signed, shift, low = _SIGNED[a.dtype]
    return _result(_moments(a, a.view(signed), shift, low), a.dtype)


def moments_bfloat16(a: np.ndarray, scratch: np.ndarray) -> Moments | None:
    """`moments` of a contiguous 1-D array of bfloat16 bits, measured as float32; ``scratch`` is
    a float32 buffer of at least ``MOMENTS_BLOCK`` elements."""
    wide = scratch[:MOMENTS_BLOCK].view(np.int32)
    return _result(_moments_bfloat16(a.view(np.uint16), wide), np.float32)
