"""The chunked numeric kernel shared by `stats`, `diff` and `report`: numpy only, no torch.

A tensor is measured in 1-D chunks small enough to stay in cache between the few passes made
over each. Values are first widened to a working dtype (float32, or float64 for 64-bit and
32-bit integer kinds whose digits float32 cannot hold); dtypes numpy lacks (bfloat16, float8,
float4) are widened by a shift or a 256-entry table built with ml_dtypes. Sums are taken with
BLAS dot products and combined across chunks in float64.

Where the compiled kernels of `_fused` are chosen (`fused_wanted`: large work, already loaded,
or ``WEIGHTSMITH_KERNEL``), float32, float64 and bfloat16 chunks go through them instead, in one
pass without the GIL; the numbers agree to float32 rounding.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from .errors import UsageError

__all__ = ["Chunk", "Part", "Scratch", "Moments", "WIDE", "work_dtype", "widen", "moments", "compare", "combine",
           "fused_available", "fused_loaded", "compare_bfloat16", "fused_wanted", "FUSED_MIN_BYTES", "KERNEL_ENV",
           "pieces", "pair_pieces", "element_count", "BLOCK_ELEMENTS",
           "from_torch", "comparable", "real_parts"]

# dtype names whose values need float64 to keep their digits; everything narrower fits float32
WIDE = frozenset({"float64", "int64", "int32", "uint32", "uint64", "complex128"})
# Above this share of the sum of squares, the squared mean would cost more than one bit of the
# variance (error grows as 1 / (1 - share)), so the chunk is shifted before squaring.
CANCELLATION = 0.5
# dtypes stored as one byte per value that numpy lacks: decoded through a table
_BYTE_KINDS = ("float8_e5m2", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
_PACKED4 = "float4_e2m1fn_x2"  # two float4 values per byte, the first in the low nibble


def work_dtype(dtype: str) -> Any:
    """The numpy dtype values of ``dtype`` (a torch dtype name) are measured in."""
    return np.float64 if dtype in WIDE else np.float32


def element_count(dtype: str, n: int) -> int:
    """Values held by ``n`` stored elements (a packed float4 byte holds two)."""
    return 2 * n if dtype == _PACKED4 else n


class Chunk(NamedTuple):
    """What one chunk contributes: moments of its finite values, and counts."""

    n: int  # finite values
    mean: float
    m2: float  # sum of squared deviations from `mean`
    lo: float
    hi: float
    zeros: int
    nans: int = 0
    infs: int = 0


class Part(NamedTuple):
    """What one pair of chunks contributes; sums over the elements finite on both sides."""

    dd: float
    aa: float
    bb: float
    ab: float
    max_abs: float
    changed: int
    nan_a: int
    nan_b: int
    differs: bool


class Scratch:
    """Buffers reused from chunk to chunk: one set per thread, plus shared read-only ones."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._ones: dict[Any, np.ndarray] = {}
        self._lock = threading.Lock()

    def ones(self, n: int, dtype: Any) -> np.ndarray:
        """A read-only vector of ``n`` ones, shared by the threads."""
        with self._lock:
            ones = self._ones.get(dtype)
            if ones is None or len(ones) < n:
                ones = self._ones[dtype] = np.ones(n, dtype)
                ones.flags.writeable = False
        return ones[:n]

    def get(self, name: str, n: int, dtype: Any) -> np.ndarray:
        """This thread's buffer ``name`` of ``n`` elements."""
        buffers = self._local.__dict__.setdefault("buffers", {})
        key = (name, np.dtype(dtype))
        buf = buffers.get(key)
        if buf is None or len(buf) < n:
            buf = buffers[key] = np.empty(n, dtype)
        return buf[:n]


class Moments:
    """Chunks' contributions folded into one tensor's moments (Chan et al.'s parallel update)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2, self.lo, self.hi = 0, 0.0, 0.0, math.inf, -math.inf
        self.zeros = self.nans = self.infs = 0

    def add(self, c: Chunk) -> None:
        self.zeros += c.zeros
        self.nans += c.nans
        self.infs += c.infs
        if c.n == 0:
            return
        total = self.n + c.n
        delta = c.mean - self.mean
        self.mean += delta * c.n / total
        self.m2 += c.m2 + delta * delta * self.n * c.n / total
        self.n = total
        self.lo, self.hi = min(self.lo, c.lo), max(self.hi, c.hi)


_tables: dict[tuple[str, Any], np.ndarray] = {}


def _table(dtype: str, work: Any) -> np.ndarray:
    """Values of every byte of a one-byte kind (two values a byte for packed float4) in ``work``."""
    table = _tables.get((dtype, work))
    if table is None:
        import ml_dtypes

        codes = np.arange(256, dtype=np.uint8)
        if dtype == _PACKED4:
            nibble = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
            table = np.stack([nibble[codes & 15], nibble[codes >> 4]], axis=1)
        else:
            table = codes.view(getattr(ml_dtypes, dtype)).astype(np.float32)
        table = _tables[(dtype, work)] = table.astype(work)
    return table


def widen(piece: np.ndarray, dtype: str, out: Any, *, work: Any = None) -> np.ndarray:
    """A 1-D piece of stored ``dtype`` values as its working dtype: the piece itself when it
    already is, else a conversion into ``out(n)`` (a function giving a buffer of ``n`` elements).

    ``piece`` holds the stored elements: uint16 bits for bfloat16, bytes for float8 and float4,
    real and imaginary parts for complex kinds. ``work`` overrides the working dtype (float64
    when the other side of a comparison needs it).
    """
    work = np.dtype(work or work_dtype(dtype))
    if piece.dtype == work:
        return piece
    if dtype == "bfloat16" and work == np.float32:  # bfloat16 is the top half of a float32
        buf = out(piece.size)
        wide = buf.view(np.uint32)
        np.copyto(wide, piece.view(np.uint16))
        np.left_shift(wide, 16, out=wide)
        return buf
    if dtype == "bfloat16":  # to float64, through float32
        buf = out(piece.size)
        np.copyto(buf, np.left_shift(piece.view(np.uint16).astype(np.uint32), 16).view(np.float32))
        return buf
    if dtype in _BYTE_KINDS or dtype == _PACKED4:
        table = _table(dtype, work)
        n = element_count(dtype, piece.size)
        buf = out(n)
        np.take(table, piece.view(np.uint8), axis=0, out=buf.reshape(piece.size, *table.shape[1:]))
        return buf
    buf = out(piece.size)
    np.copyto(buf, piece, casting="unsafe")
    return buf


# Elements per block: a float32 block and its temporaries stay in a core's own (L2) cache
# between the few passes made over it, which nearly halves the time of a pass over memory
BLOCK_ELEMENTS = 64 * 1024


def moments(a: np.ndarray, scratch: Scratch, *, dtype: str | None = None, fused: bool = False) -> Chunk:
    """The contribution of one 1-D chunk: float32 or float64 values, or (given ``dtype``) stored
    elements of that dtype, widened block by block. With ``fused`` (the compiled kernel loaded),
    float32, float64 and bfloat16 chunks are measured in one compiled pass without the GIL."""
    if fused and fused_loaded() and a.ndim == 1 and a.flags.c_contiguous:
        out = _fused_moments(a, dtype, scratch)
        if out is not None:  # None: a NaN or Inf, measured below
            return Chunk(*out)
    step = BLOCK_ELEMENTS // 2 if dtype == _PACKED4 else BLOCK_ELEMENTS
    if dtype is not None:
        work = work_dtype(dtype)
        blocks = (widen(a[i:i + step], dtype, lambda n: scratch.get("upcast", n, work))
                  for i in range(0, a.size, step))
    else:
        blocks = (a[i:i + step] for i in range(0, a.size, step))
    if a.size <= step:
        return _moments(next(iter(blocks)), scratch)
    total = Moments()
    for block in blocks:
        total.add(_moments(block, scratch))
    return Chunk(total.n, total.mean, total.m2, total.lo, total.hi, total.zeros, total.nans, total.infs)


def _fused_moments(a: np.ndarray, dtype: str | None, scratch: Scratch) -> Any:
    """The compiled kernel's moments of a chunk: bfloat16 read as it is, other stored kinds
    widened to their working dtype first (as a torch tensor of them is), so both paths agree."""
    if dtype == "bfloat16":
        return _fused.moments_bfloat16(a, scratch.get("fused16", _fused.MOMENTS_BLOCK, np.float32))
    if dtype is not None and a.dtype != work_dtype(dtype):
        work = work_dtype(dtype)
        a = widen(a, dtype, lambda n: scratch.get("upcast", n, work))
    return _fused.moments(a) if a.dtype in (np.float32, np.float64) else None


def _moments(a: np.ndarray, scratch: Scratch) -> Chunk:
    m = a.size
    with np.errstate(all="ignore"):  # Inf - Inf or an overflow: found just below
        s = float(np.dot(a, scratch.ones(m, a.dtype)))  # BLAS: the fastest exact-enough sum
    if not math.isfinite(s):  # a NaN or Inf always makes the sum non-finite: find them now
        return _moments_nonfinite(a)
    lo, hi = float(np.minimum.reduce(a)), float(np.maximum.reduce(a))
    if lo == hi:  # constant: exact, so a constant tensor gets a std of exactly 0
        return Chunk(m, lo, 0.0, lo, hi, m if lo == 0 else 0)
    mean, ss = s / m, float(np.dot(a, a))
    if m * mean * mean > CANCELLATION * ss:
        # the mean dominates: squares about zero would cancel away the spread, so take them
        # about the chunk's mean (as rounded to the work dtype) instead
        k = float(a.dtype.type(mean))
        d = np.subtract(a, a.dtype.type(k), out=scratch.get("shifted", m, a.dtype))
        ss, mean_k = float(np.dot(d, d)), mean - k
    else:
        mean_k = mean
    zeros = 0
    if lo <= 0.0 <= hi:
        hits = np.equal(a, 0, out=scratch.get("flags", m, np.bool_))
        zeros = int(np.count_nonzero(hits))
    return Chunk(m, mean, max(ss - m * mean_k * mean_k, 0.0), lo, hi, zeros)


def _moments_nonfinite(a: np.ndarray) -> Chunk:
    finite = np.isfinite(a)
    nans = int(np.count_nonzero(np.isnan(a)))
    f = a[finite].astype(np.float64)
    zeros = int(np.count_nonzero(f == 0))
    if not f.size:
        return Chunk(0, 0.0, 0.0, math.inf, -math.inf, zeros, nans, a.size - nans)
    mean = float(f.mean())
    return Chunk(f.size, mean, float(np.square(f - mean).sum()), float(f.min()), float(f.max()),
                 zeros, nans, a.size - f.size - nans)


# Loading the compiled kernel costs about 0.45 s and 140 MB once per process; on two cores (11 GB/s
# against numpy's 4.8) it pays for itself from about 3.6 GB compared, sooner on more cores. Once
# loaded it is always used.
FUSED_MIN_BYTES = 3 * 2**30
KERNEL_ENV = "WEIGHTSMITH_KERNEL"  # "auto" (default), "numpy" or "compiled"


def fused_wanted(nbytes: int) -> bool:
    """Whether to measure ``nbytes`` with the compiled kernels: by the ``WEIGHTSMITH_KERNEL``
    environment variable, else when it is loaded already or the work is large enough to pay
    for loading it."""
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in ("auto", "numpy", "compiled"):
        raise UsageError(f"{KERNEL_ENV}={choice!r}: expected 'auto', 'numpy' or 'compiled'")
    if choice == "numpy":
        return False
    if choice == "compiled" and not fused_available():
        raise UsageError(f"{KERNEL_ENV}=compiled needs numba: pip install 'weightsmith[fast]'")
    return choice == "compiled" or ((nbytes >= FUSED_MIN_BYTES or fused_loaded()) and fused_available())


def fused_available() -> bool:
    """Whether the compiled kernels (numba, the ``fast`` extra) can be used; loads them."""
    global _fused
    if _fused is None:
        try:
            from . import _fused as module
        except ImportError:
            _fused = False
        else:
            _fused = module
    return _fused is not False


def fused_loaded() -> bool:
    """Whether the compiled kernels are already loaded in this process (so using them is free)."""
    return _fused not in (None, False)


_fused: Any = None  # the `_fused` module once imported; False when numba is missing


def compare(a: np.ndarray, b: np.ndarray, atol: float, rtol: float, scratch: Scratch, *,
            fused: bool = False) -> Part:
    """The contribution of one pair of 1-D chunks of one working dtype.

    With ``fused`` (and numba installed) one compiled pass computes everything without holding
    the GIL. Otherwise one pass writes the difference and the sums are BLAS dot products over
    data still in cache. A NaN or Inf anywhere (or an overflow) makes a sum non-finite, and only
    then is the pair taken apart element by element, in float64.
    """
    if fused and fused_loaded() and a.flags.c_contiguous and b.flags.c_contiguous:
        part = _fused_part(_fused.compare(a, b, scratch.get("fused", _fused.BLOCK, a.dtype), atol, rtol))
        if part is not None:
            return part
    return _compare_numpy(a, b, atol, rtol, scratch)


def compare_bfloat16(a: np.ndarray, b: np.ndarray, atol: float, rtol: float, scratch: Scratch) -> Part | None:
    """`compare` for two pieces of bfloat16 bits in one compiled pass (measured as float32), or
    ``None`` when that kernel is not loaded, a piece is not contiguous or holds a NaN or Inf."""
    if not (fused_loaded() and a.flags.c_contiguous and b.flags.c_contiguous):
        return None
    return _fused_part(_fused.compare_bfloat16(a, b, scratch.get("fused16", 3 * _fused.BLOCK, np.float32),
                                               atol, rtol))


def _fused_part(out: tuple[float, float, float, float, float, int]) -> Part | None:
    """The compiled kernel's six results as a `Part`; ``None`` when a sum is not finite (a NaN or
    Inf in the data, to be taken apart element by element)."""
    dd, aa, bb, ab, max_abs, changed = out
    if math.isfinite(dd) and math.isfinite(aa) and math.isfinite(bb):
        return Part(dd, aa, bb, ab, max_abs, changed, 0, 0, max_abs > 0)
    return None


def _compare_numpy(a: np.ndarray, b: np.ndarray, atol: float, rtol: float, scratch: Scratch) -> Part:
    with np.errstate(all="ignore"):  # Inf - Inf, overflow: handled below, not worth a warning
        m, work = a.size, a.dtype
        d = np.subtract(a, b, out=scratch.get("d", m, work))
        dd, aa, bb = float(np.dot(d, d)), float(np.dot(a, a)), float(np.dot(b, b))
        if not (math.isfinite(dd) and math.isfinite(aa) and math.isfinite(bb)):
            return _compare_nonfinite(a, b, atol, rtol)
        ab = float(np.dot(a, b))
        if dd == 0.0:
            if not d.any():
                return Part(0.0, aa, bb, ab, 0.0, 0, 0, 0, False)
            # differences so small that their squares underflowed the working dtype
            wide = d.astype(np.float64)
            dd = float(np.dot(wide, wide))
        max_abs = max(float(np.maximum.reduce(d)), -float(np.minimum.reduce(d)))
        if max_abs <= atol:
            changed = 0
        elif atol == 0.0 and rtol == 0.0:  # exact: every nonzero difference is a change
            changed = int(np.count_nonzero(np.not_equal(d, 0, out=scratch.get("flags", m, np.bool_))))
        else:
            # tolerances compared in float64, as the compiled kernel does
            absd = np.abs(d, out=d)
            flags = scratch.get("flags", m, np.bool_)
            if rtol == 0.0:
                changed = int(np.count_nonzero(np.greater(absd, np.float64(atol), out=flags)))
            else:
                tol = np.abs(a, out=scratch.get("tol", m, np.float64))
                np.multiply(tol, rtol, out=tol)
                np.add(tol, atol, out=tol)
                changed = int(np.count_nonzero(np.greater(absd, tol, out=flags)))
        return Part(dd, aa, bb, ab, max_abs, changed, 0, 0, True)


def combine(parts: list[Part]) -> Part:
    """The contribution of several pairs of chunks, as one."""
    return Part(math.fsum(p.dd for p in parts), math.fsum(p.aa for p in parts), math.fsum(p.bb for p in parts),
                math.fsum(p.ab for p in parts), max(p.max_abs for p in parts), sum(p.changed for p in parts),
                sum(p.nan_a for p in parts), sum(p.nan_b for p in parts), any(p.differs for p in parts))


def _compare_nonfinite(a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> Part:
    a, b = a.astype(np.float64), b.astype(np.float64)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    both = np.isfinite(a) & np.isfinite(b)
    same = (nan_a & nan_b) | (a == b)  # NaN on both sides, or the same infinity
    odd = int(np.count_nonzero(~both & ~same))
    fa, fb = a[both], b[both]
    absd = np.abs(fa - fb)
    max_abs = float(absd.max()) if absd.size else 0.0
    changed = odd + int(np.count_nonzero(absd > atol + rtol * np.abs(fa)))
    return Part(float(absd @ absd), float(fa @ fa), float(fb @ fb), float(fa @ fb), max_abs, changed,
                int(np.count_nonzero(nan_a)), int(np.count_nonzero(nan_b)), odd > 0 or max_abs > 0)


def _dense(a: np.ndarray) -> np.ndarray:
    """``a`` with its axes in memory order when that makes it contiguous (statistics do not
    depend on order), else ``a``."""
    if a.ndim < 2:
        return a
    order = sorted(range(a.ndim), key=lambda d: -abs(a.strides[d]))
    t = a.transpose(order)
    return t if t.flags.c_contiguous else a


def pieces(a: np.ndarray, step: int) -> Iterator[np.ndarray]:
    """1-D pieces of at most ``step`` elements covering ``a`` in any order: views when its
    memory is dense, else copies of a few rows."""
    if a.ndim == 0:
        yield a.reshape(1)
        return
    if a.size == 0:
        return
    a = _dense(a)
    if a.flags.c_contiguous:
        flat = a.reshape(-1)
        for i in range(0, flat.size, step):
            yield flat[i:i + step]
        return
    row = a[0].size
    if row > step:
        for i in range(a.shape[0]):
            yield from pieces(a[i], step)
        return
    rows = max(1, step // row)
    for i in range(0, a.shape[0], rows):
        yield a[i:i + rows].reshape(-1)


def pair_pieces(a: np.ndarray, b: np.ndarray, step: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Matching 1-D pieces of ``a`` and ``b`` (one shape) in row-major order: views where both
    are contiguous, else copies of a few rows (never of a whole tensor)."""
    if a.ndim == 0:
        yield a.reshape(1), b.reshape(1)
        return
    if a.size == 0:
        return
    if a.flags.c_contiguous and b.flags.c_contiguous:
        fa, fb = a.reshape(-1), b.reshape(-1)
        for i in range(0, fa.size, step):
            yield fa[i:i + step], fb[i:i + step]
        return
    row = a[0].size
    if row > step:
        for i in range(a.shape[0]):
            yield from pair_pieces(a[i], b[i], step)
        return
    rows = max(1, step // row)
    for i in range(0, a.shape[0], rows):
        yield a[i:i + rows].reshape(-1), b[i:i + rows].reshape(-1)


# stored as bits numpy has no dtype for: read as raw bits, widened by `widen`
_BITS_AS = {"bfloat16": "int16", "float8_e5m2": "uint8", "float8_e4m3fn": "uint8", "float8_e4m3fnuz": "uint8",
            "float8_e5m2fnuz": "uint8", "float8_e8m0fnu": "uint8", "float4_e2m1fn_x2": "uint8"}
# dtypes numpy holds as they are
_NUMPY = frozenset({"bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16",
                    "float32", "float64", "complex64", "complex128"})


def from_torch(t: Any) -> tuple[np.ndarray | None, str]:
    """A torch tensor's stored elements as a numpy array (a view on the CPU; ``None`` for a dtype
    that cannot be measured), and its dtype name. Quantized tensors are dequantized, lazy
    conjugates and negations resolved, tensors elsewhere copied to the CPU."""
    import torch

    t = t.detach()
    if t.is_quantized:
        t = t.dequantize()
    t = t.resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        t = t.cpu()
    name = str(t.dtype).removeprefix("torch.")
    if name in _BITS_AS:
        return t.view(getattr(torch, _BITS_AS[name])).numpy(), name
    return (t.numpy(), name) if name in _NUMPY else (None, name)


def comparable(xa: np.ndarray | None, da: str, xb: np.ndarray | None, db: str
               ) -> tuple[tuple[Any, str], tuple[Any, str]]:
    """Two arrays of stored elements made real-valued (complex as real and imaginary parts in a
    trailing dimension; a real side compared with a complex one becomes complex first)."""
    if xa is None or xb is None:
        return (None, da), (None, db)
    complex_a, complex_b = xa.dtype.kind == "c", xb.dtype.kind == "c"
    if complex_a != complex_b:
        common = xa.dtype if complex_a else xb.dtype
        xa, xb = (x if x.dtype.kind == "c" else _widened(x, d).astype(common) for x, d in ((xa, da), (xb, db)))
    if xa.dtype.kind == "c":
        (xa, da), (xb, db) = _as_real(xa), _as_real(xb)
    return (xa, da), (xb, db)


def real_parts(x: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
    """``x`` real-valued: complex as real and imaginary parts, others as they are."""
    return _as_real(x) if x.dtype.kind == "c" else (x, dtype)


def _widened(x: np.ndarray, dtype: str) -> np.ndarray:
    flat = np.ascontiguousarray(x).reshape(-1)
    out = widen(flat, dtype, lambda n: np.empty(n, work_dtype(dtype)))
    return out.reshape(x.shape) if dtype != _PACKED4 else out.reshape(*x.shape[:-1], -1)


def _as_real(x: np.ndarray) -> tuple[np.ndarray, str]:
    real = x.real.dtype
    parts = np.stack([x.real, x.imag], axis=-1) if not x.flags.c_contiguous else \
        x.reshape(-1).view(real).reshape(*x.shape, 2)
    return parts, real.name
