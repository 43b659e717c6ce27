"""The merge methods: how one output tensor is computed from its inputs, a chunk at a time.

Every function here takes flattened (1-D) input tensors of any floating dtype, accumulates in
float32 (float64 when an input is float64), and writes into a preallocated flat output. Work
runs over chunks of ``CHUNK`` elements, so the memory used beyond the inputs' mapped pages and
the output is a few chunk-sized buffers. Methods that need a whole-tensor quantity (a
magnitude threshold, norms, angles) take it in a first pass over the chunks. Inputs are never
written to: a float32 chunk of a float32 input *is* the input's memory.

Formulas (τᵢ = θᵢ − θ_base, wᵢ the weights, λ = ``lambda_``):

=================  ===============================================================================
``linear``         Σ wᵢθᵢ / Σ wᵢ (``normalize=False``: Σ wᵢθᵢ)
``task_arithmetic`` θ_base + λ Σ wᵢτᵢ (``normalize=True``: divided by Σ wᵢ)
``ties``           trim each τᵢ to its ``density`` fraction of largest magnitudes; elect a sign
                   per element, sign(Σ wᵢτᵢ) (``consensus="sum"``) or sign(Σ sign(wᵢτᵢ))
                   (``"count"``), zero electing +; θ_base + λ Σ wᵢτᵢ[agrees] / Σ wᵢ[agrees]
                   (``normalize=False``: no division)
``dare_linear``    drop each element of τᵢ with probability 1 − density, rescale the rest by
                   1/density (``rescale=False``: no rescale); then as ``task_arithmetic``
``dare_ties``      the same drop and rescale; then the sign election and disjoint mean of ``ties``
``slerp``          on the flattened tensors a, b with cos Ω = â·b̂:
                   sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b; (1−t)a + tb when |cos Ω| > 0.9995 or
                   a norm is zero
``model_stock``    c = mean over pairs of cos(τᵢ, τⱼ) (0 for a zero τ); r = N c / (1 + (N−1) c);
                   r · mean(θᵢ) + (1 − r) θ_base
=================  ===============================================================================

Trimming keeps exactly ``max(1, int(density · numel))`` elements (none at density 0): those above
the threshold magnitude, then those equal to it in index order. ``normalize`` defaults to true
for ``linear`` and ``ties``, false otherwise (as mergekit's defaults). DARE rescales by 1/density
as in its paper; mergekit instead rescales to keep the task vector's L1 norm, and draws its
masks from torch's global generator, so DARE results are not comparable element by element. DARE's draws are ``torch.rand`` from a generator seeded
with `dare_seed` (``seed``, output key, input index), one draw per chunk in order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["METHODS", "NEEDS_BASE", "Params", "combine", "dare_seed", "CHUNK"]

CHUNK = 1 << 20  # elements per chunk: 4 MB of float32 per buffer (fewer, larger parallel regions)
METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "model_stock",
           "passthrough")
NEEDS_BASE = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "model_stock")
_COLINEAR = 0.9995


@dataclass
class Params:
    """The parameters of one output tensor, resolved for its key (numbers only)."""

    weights: list[float] = field(default_factory=list)
    density: list[float] = field(default_factory=list)  # one per input
    t: float = 0.5
    lambda_: float = 1.0
    normalize: bool = True
    consensus: str = "sum"
    rescale: bool = True
    seed: int = 0


def dare_seed(seed: int, key: str, index: int) -> int:
    """The generator seed of DARE's drop mask for input ``index`` of output ``key``."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _acc_dtype(xs: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _spans(numel: int, chunk: int) -> Iterator[slice]:
    for s in range(0, numel, chunk):
        yield slice(s, min(s + chunk, numel))


def combine(method: str, xs: Sequence[torch.Tensor], base: torch.Tensor | None, p: Params,
            out: torch.Tensor, *, key: str = "", chunk: int = CHUNK) -> None:
    """Write the merge of flat inputs ``xs`` (and ``base``) into the flat tensor ``out``."""
    fn = _FUNCS[method]
    acc = _acc_dtype([*xs, *([base] if base is not None else [])])
    fn(list(xs), base, p, out, acc=acc, key=key, chunk=chunk)


# -- weighted sums ----------------------------------------------------------------------------
def _linear(xs: list[torch.Tensor], _base: Any, p: Params, out: torch.Tensor, *, acc: torch.dtype,
            key: str, chunk: int) -> None:
    total = sum(p.weights)
    divisor = total if p.normalize and total != 0 else 1.0
    weights = [w / divisor for w in p.weights]  # normalized up front: no pass to divide the sum
    direct = out.dtype == acc  # accumulate in the output itself: no temporary, no copy
    for sl in _spans(out.numel(), chunk):
        first = xs[0][sl].to(acc)  # a no-op for float32 input; bf16 must not be multiplied in bf16
        y = torch.mul(first, weights[0], out=out[sl]) if direct else first * weights[0]
        for x, w in zip(xs[1:], weights[1:]):
            y.add_(x[sl], alpha=w) if x.dtype == acc else y.add_(x[sl].to(acc), alpha=w)
        if not direct:
            out[sl] = y


def _task_sum(xs: list[torch.Tensor], base: torch.Tensor, p: Params, out: torch.Tensor, *, acc: torch.dtype,
              key: str, chunk: int, drop: bool = False) -> None:
    gens = _generators(p, key, len(xs)) if drop else None
    total = sum(p.weights)
    scale = p.lambda_ / total if p.normalize and abs(total) >= 1e-8 else p.lambda_
    for sl in _spans(out.numel(), chunk):
        b = base[sl].to(acc)
        y = torch.zeros_like(b)
        for i, (x, w) in enumerate(zip(xs, p.weights)):
            tau = x[sl].to(acc) - b
            if gens is not None:
                tau = _dropped(tau, gens[i], p.density[i], p.rescale)
            y.add_(tau, alpha=w)
        out[sl] = torch.add(b, y, alpha=scale)  # b may be the input's own memory


def _dare_linear(xs: list[torch.Tensor], base: torch.Tensor, p: Params, out: torch.Tensor, **kw: Any) -> None:
    _task_sum(xs, base, p, out, drop=True, **kw)


# -- DARE's random drop -----------------------------------------------------------------------
def _generators(p: Params, key: str, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(dare_seed(p.seed, key, i)) for i in range(n)]


def _drop_mask(n: int, gen: torch.Generator, density: float) -> torch.Tensor:
    return torch.rand(n, generator=gen) < density


def _dropped(tau: torch.Tensor, gen: torch.Generator, density: float, rescale: bool) -> torch.Tensor:
    tau.mul_(_drop_mask(tau.numel(), gen, density))  # tau is a fresh difference: ours to change
    if rescale and 0 < density < 1:
        tau.div_(density)
    return tau


# -- TIES: trim, elect, disjoint mean ---------------------------------------------------------
_BINS = 1 << 16


class _Work:
    """Chunk-sized buffers reused for every chunk of one tensor: no allocation inside the loop
    (freed and re-made buffers of mixed sizes otherwise grow the heap well past their sum)."""

    def __init__(self, chunk: int, acc: torch.dtype, n: int) -> None:
        self.taus = [torch.empty(chunk, dtype=acc) for _ in range(n)]
        self.a = torch.empty(chunk, dtype=torch.float32)      # magnitudes
        self.bits = torch.empty(chunk, dtype=torch.int32)
        self.mask = torch.empty(chunk, dtype=torch.bool)
        self.b = torch.empty(chunk, dtype=acc)
        self.votes = torch.empty(chunk, dtype=acc)
        self.sign = torch.empty(chunk, dtype=acc)
        self.merged = torch.empty(chunk, dtype=acc)
        self.divisor = torch.empty(chunk, dtype=acc)


def _magnitudes(tau: torch.Tensor, work: _Work) -> torch.Tensor:
    """|tau| as float32 in the work buffer (a float64 chunk is rounded after the subtraction)."""
    a = work.a[:tau.numel()]
    return torch.abs(tau, out=a) if tau.dtype == torch.float32 else a.copy_(tau.abs())


def _threshold(abs_chunks: Callable[[], Iterator[torch.Tensor]], k: int, work: _Work) -> tuple[float, int, int]:
    """The k-th largest magnitude, how many elements equal to it are kept, and how many there are.

    An exact radix selection over the bit patterns of non-negative float32 values (ordered as
    the integers they read as), in two passes of 16 bits each: no sort, no copy of the tensor.
    """
    hist = torch.zeros(_BINS, dtype=torch.int64)
    for a in abs_chunks():
        bits = torch.bitwise_right_shift(a.view(torch.int32), 16, out=work.bits[:a.numel()])
        hist += torch.bincount(bits, minlength=_BINS)
    hi, above = _bin_of(hist, k)
    hist2 = torch.zeros(_BINS + 2, dtype=torch.int64)
    for a in abs_chunks():  # low 16 bits of the elements in bin hi; the rest land in the end bins
        rel = torch.sub(a.view(torch.int32), hi << 16, out=work.bits[:a.numel()])
        hist2 += torch.bincount(rel.clamp_(-1, _BINS).add_(1), minlength=_BINS + 2)
    lo, above2 = _bin_of(hist2[1:-1], k - above)
    value = float(torch.tensor((hi << 16) | lo, dtype=torch.int32).view(torch.float32))
    return value, k - above - above2, int(hist2[1 + lo])


def _bin_of(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element, and how many elements lie in higher bins."""
    from_top = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor(k, dtype=torch.int64)))
    b = hist.numel() - 1 - j
    return b, int(from_top[j]) - int(hist[b])


class _Trim:
    """Trimming of one task vector to its ``k`` largest magnitudes, chunk by chunk in index order."""

    def __init__(self, tau_chunks: Callable[[], Iterator[torch.Tensor]], numel: int, density: float,
                 work: _Work) -> None:
        self.k = max(1, int(density * numel)) if density > 0 and numel else 0  # density > 0 keeps one
        self.all = self.k >= numel
        self.none = self.k <= 0
        self.value, self.equal_left, self.equal = 0.0, 0, 0
        if not (self.all or self.none):
            self.value, self.equal_left, self.equal = _threshold(
                lambda: (_magnitudes(t, work) for t in tau_chunks()), self.k, work)

    def apply_(self, tau: torch.Tensor, work: _Work) -> torch.Tensor:
        """Zero, in place, the entries of ``tau`` that trimming drops."""
        if self.all:
            return tau
        if self.none:
            return tau.zero_()
        a = _magnitudes(tau, work)
        keep = work.mask[:tau.numel()]
        if self.equal_left == self.equal:  # every element equal to the threshold is kept
            return tau.mul_(torch.ge(a, self.value, out=keep))
        torch.gt(a, self.value, out=keep)
        if self.equal_left > 0:  # ties at the threshold: the first ones in index order
            equal = a == self.value
            rank = equal.cumsum(0)
            keep |= equal & (rank <= self.equal_left)
            self.equal_left -= min(int(rank[-1]), self.equal_left)
        return tau.mul_(keep)


def _elect(xs: list[torch.Tensor], base: torch.Tensor, p: Params, out: torch.Tensor, *, acc: torch.dtype,
           key: str, chunk: int, sparsify: str) -> None:
    """Sign election and disjoint mean over sparsified, weighted task vectors.

    With E the elected sign (±1), an entry agrees when d·E > 0; Σ of the agreeing d is
    E · Σ max(d·E, 0), so no stacked copy of the inputs is needed.
    """
    numel = out.numel()
    chunk = min(chunk, CHUNK // 4)  # ten buffers a chunk long: 10 MB of them in all
    work = _Work(min(chunk, max(numel, 1)), acc, len(xs))

    def base_chunk(sl: slice) -> torch.Tensor:
        return base[sl] if base.dtype == acc else work.b[:sl.stop - sl.start].copy_(base[sl])

    def task_vector(i: int, sl: slice, b: torch.Tensor) -> torch.Tensor:
        return work.taus[i][:sl.stop - sl.start].copy_(xs[i][sl]).sub_(b)

    trims: list[_Trim | None] = [None] * len(xs)
    gens = None
    if sparsify == "magnitude":
        for i in range(len(xs)):
            def taus(i: int = i) -> Iterator[torch.Tensor]:
                for sl in _spans(numel, chunk):
                    yield task_vector(i, sl, base_chunk(sl))
            trims[i] = _Trim(taus, numel, p.density[i], work)
    else:
        gens = _generators(p, key, len(xs))
    for sl in _spans(numel, chunk):
        n = sl.stop - sl.start
        b = base_chunk(sl)
        deltas = []
        for i, w in enumerate(p.weights):
            tau = task_vector(i, sl, b)
            trim = trims[i]
            if trim is not None:
                trim.apply_(tau, work)
            elif gens is not None:
                _dropped(tau, gens[i], p.density[i], p.rescale)
            deltas.append(tau.mul_(w) if w != 1 else tau)
        votes = work.votes[:n]
        if p.consensus == "count":
            torch.sign(deltas[0], out=votes)
            for d in deltas[1:]:
                votes.add_(torch.sign(d, out=work.sign[:n]))
        else:
            votes.copy_(deltas[0])
            for d in deltas[1:]:
                votes.add_(d)
        sign = work.sign[:n].copy_(torch.ge(votes, 0, out=work.mask[:n])).mul_(2).sub_(1)  # ±1; a tie elects +
        merged = work.merged[:n].zero_()
        divisor = work.divisor[:n].zero_() if p.normalize else None
        for d, w in zip(deltas, p.weights):
            agreeing = d.mul_(sign).clamp_(min=0)  # |d| where d agrees with the sign, else 0
            merged.add_(agreeing)
            if divisor is not None:
                divisor.add_(agreeing.sign_(), alpha=w)
        merged.mul_(sign)
        if divisor is not None:  # where nothing agrees, merged is 0: divide by 1
            merged.div_(divisor.add_(torch.eq(divisor, 0, out=work.mask[:n])))
        if p.lambda_ != 1:
            merged.mul_(p.lambda_)
        out[sl] = merged.add_(b)


def _ties(xs: list[torch.Tensor], base: torch.Tensor, p: Params, out: torch.Tensor, **kw: Any) -> None:
    _elect(xs, base, p, out, sparsify="magnitude", **kw)


def _dare_ties(xs: list[torch.Tensor], base: torch.Tensor, p: Params, out: torch.Tensor, **kw: Any) -> None:
    _elect(xs, base, p, out, sparsify="random", **kw)


# -- angles -----------------------------------------------------------------------------------
def _slerp(xs: list[torch.Tensor], base: torch.Tensor | None, p: Params, out: torch.Tensor, *,
           acc: torch.dtype, key: str, chunk: int) -> None:
    a, b = (base, xs[0]) if base is not None else (xs[0], xs[1])
    dot = na = nb = 0.0
    for sl in _spans(out.numel(), chunk):
        x, y = a[sl].double(), b[sl].double()
        dot += float(x @ y)
        na += float(x @ x)
        nb += float(y @ y)
    t = p.t
    s0, s1 = 1.0 - t, t
    if na > 0 and nb > 0:
        cos = dot / math.sqrt(na * nb)
        if abs(cos) <= _COLINEAR:
            omega = math.acos(max(-1.0, min(1.0, cos)))
            s0 = math.sin((1 - t) * omega) / math.sin(omega)
            s1 = math.sin(t * omega) / math.sin(omega)
    for sl in _spans(out.numel(), chunk):
        out[sl] = a[sl].to(acc).mul(s0).add_(b[sl].to(acc), alpha=s1)


def _model_stock(xs: list[torch.Tensor], base: torch.Tensor, p: Params, out: torch.Tensor, *,
                 acc: torch.dtype, key: str, chunk: int) -> None:
    n = len(xs)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for sl in _spans(out.numel(), chunk):
        b = base[sl].double()
        taus = torch.stack([x[sl].double() - b for x in xs])
        gram += taus @ taus.T
    norms = gram.diagonal().sqrt()
    cosines = [float(gram[i, j] / (norms[i] * norms[j])) if norms[i] > 0 and norms[j] > 0 else 0.0
               for i in range(n) for j in range(i + 1, n)]
    c = sum(cosines) / len(cosines)
    r = n * c / (1 + (n - 1) * c) if (1 + (n - 1) * c) != 0 else 0.0
    for sl in _spans(out.numel(), chunk):
        mean = torch.zeros(sl.stop - sl.start, dtype=acc)
        for x in xs:
            mean.add_(x[sl].to(acc))
        mean.div_(n)
        out[sl] = mean.mul_(r).add_(base[sl].to(acc), alpha=1 - r)


def _passthrough(xs: list[torch.Tensor], _base: Any, _p: Params, out: torch.Tensor, *, acc: torch.dtype,
                 key: str, chunk: int) -> None:
    for sl in _spans(out.numel(), chunk):
        out[sl] = xs[0][sl]


_FUNCS: dict[str, Callable[..., None]] = {
    "linear": _linear, "task_arithmetic": _task_sum, "ties": _ties, "dare_linear": _dare_linear,
    "dare_ties": _dare_ties, "slerp": _slerp, "model_stock": _model_stock, "passthrough": _passthrough,
}
