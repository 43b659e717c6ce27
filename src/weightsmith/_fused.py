"""Single-pass comparison of two float arrays, compiled with numba (the ``fast`` extra).

numpy makes one pass per quantity (difference, three sums, max, count) and holds the GIL
between them, so a second thread gains nothing. This kernel reads each element of both sides
once, keeps the sums in float64 and runs without the GIL, so the threads of `diff` run on
separate cores. Importing this module raises ImportError when numba is not installed; callers
fall back to the numpy kernel in `_measure`, which gives the same results.

Sums are reassociated into SIMD lanes (``reassoc``), which keeps NaN and Inf propagating, so a
non-finite sum still signals a NaN or Inf in the data. The largest difference and the count of
changed elements are taken from the bits of the difference: with the sign bit cleared, an IEEE
float orders as an unsigned integer, and integer maxima vectorize where float ones may not.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["BLOCK", "compare", "compare_bfloat16"]

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

