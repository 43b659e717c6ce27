"""Per-tensor statistics in one chunked pass: mean, std, range, norm, zeros, NaN and Inf counts.

Checkpoint files are read as numpy arrays over the mapped file (see `weightsmith.io._arrays`),
so measuring a file never imports torch; the numeric kernel is `weightsmith._measure`.

Each tensor is read once, in chunks of a flattened view on its own device, so a huge tensor
never doubles memory; a checkpoint is streamed tensor by tensor. Moments are combined across
chunks in float64 (Chan et al.'s parallel update); where a chunk's mean dominates its spread,
its squares are taken about that mean, so data with mean 1 and std 1e-3 keeps its std to float
precision where a plain float32 sum of squares is off by percents.

On the CPU, chunks are measured by a few worker threads at once, each with single-threaded
numpy kernels (BLAS dot products, SIMD min/max): a handful of short operations per chunk, with
no thread barrier inside any of them, keeps pace with memory even on a busy machine, where
multi-threaded torch reductions each wait for their slowest thread.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np

from . import _measure
from ._measure import Chunk as _Chunk, Scratch
from ._tensors import dtype_name as _dtype_name, is_dtensor as _is_dtensor
from .errors import UsageError
from ._result import Result
from .selectors import Selector, select as select_names

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["TensorStats", "StatsReport", "stats", "CHUNK_BYTES", "MAX_WORKERS"]

# Elements per step, in bytes of the working dtype. Small enough that the chunks in flight stay
# in a typical L3 cache between the passes over them, large enough to amortize per-call overhead.
CHUNK_BYTES = 4 * 2**20
MAX_WORKERS = 8  # memory bandwidth, not cores, bounds the pass; more threads add only buffers

Progress = Callable[[int, int, str], None]


@dataclass
class TensorStats:
    """Statistics of one tensor.

    ``mean``, ``std`` (population: divides by n), ``min``, ``max``, ``absmax`` and ``l2`` are
    over the finite values; ``nan_count`` and ``inf_count`` count the others. They are
    ``nan`` when there is no finite value. Complex tensors are measured over their real and
    imaginary parts.
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    mean: float
    std: float
    min: float
    max: float
    absmax: float
    l2: float
    zero_fraction: float
    nan_count: int
    inf_count: int

    @property
    def finite(self) -> bool:
        """Whether every value is finite."""
        return self.nan_count == 0 and self.inf_count == 0


@dataclass
class StatsReport(Result):
    """`TensorStats` for each tensor measured, in the target's order.

    Attributes:
        source: what was measured (a class name or a checkpoint path).
        tensors: one entry per distinct tensor.
        aliases: tied names -> the name they were measured under (a shared tensor is read once).
        skipped: names that hold no readable data (meta, lazy, sharded) -> why.
        nbytes: bytes read.
    """

    SCHEMA: ClassVar[str] = "weightsmith.stats/1"

    source: str
    tensors: list[TensorStats]
    aliases: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    nbytes: int = 0

    def __getitem__(self, key: str) -> TensorStats:
        key = self.aliases.get(key, key)
        for s in self.tensors:
            if s.key == key:
                return s
        raise KeyError(key)

    def __iter__(self) -> Iterator[TensorStats]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def _rich_(self) -> Any:
        from rich.table import Table

        table = Table(title=f"statistics of {self.source}",
                      caption=f"{len(self.tensors)} tensors, {self.nbytes:,} bytes read"
                      + (f"; skipped: {', '.join(self.skipped)}" if self.skipped else ""))
        for col in ("name", "dtype", "shape", "mean ± std", "min", "max", "l2", "zeros", "nan",
                    "inf"):
            table.add_column(col, justify="left" if col in ("name", "dtype", "shape") else "right")
        for s in self.tensors:
            table.add_row(s.key, s.dtype, str(s.shape), f"{s.mean:.4g} ± {s.std:.4g}",
                          f"{s.min:.4g}", f"{s.max:.4g}", f"{s.l2:.4g}", f"{s.zero_fraction:.1%}",
                          str(s.nan_count), str(s.inf_count))
        return table


def stats(
    target: nn.Module | Mapping[str, Any] | torch.Tensor | str | os.PathLike[str],
    *,
    select: Selector | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    workers: int | None = None,
    progress: Progress | None = None,
) -> StatsReport:
    """Measure every tensor of a model, state dict or checkpoint in one chunked pass each.

    Parameters and buffers of a model are both measured; a tied tensor is measured once,
    under its first name (the other names go to ``aliases``). Checkpoint tensors are read one
    at a time, as numpy views of the mapped file where the format allows (torch is then never
    imported), else with ``.tensor(key)``. For a model sharded across
    ranks (``DTensor`` parameters, FSDP2) every rank calls it: each measures its own shards and
    the ranks combine their moments, so every rank gets the whole tensors' statistics.

    Args:
        target: an ``nn.Module``, a mapping of names to tensors, an opened checkpoint, or a
            single tensor (reported under the name ``""``).
        select: only these names (see `weightsmith.selectors`).
        chunk_bytes: size of one chunk in its working dtype (float32, or float64 for 64-bit
            types). Extra memory is about ``(workers / 4 + 1) × chunk_bytes`` for dense
            float32 tensors, and at most ``(3.5 × workers + 1) × chunk_bytes``.
        workers: threads measuring CPU chunks at once; default ``torch.get_num_threads()``
            (the CPU count when torch is not imported), at most 8.
        progress: called as ``progress(done_bytes, total_bytes, key)`` after each chunk.

    Returns:
        A `StatsReport`; ``report["0.weight"].std`` and friends.

    Raises:
        TypeError: ``target`` is none of the above.
        ValueError: ``chunk_bytes`` is below 64, ``workers`` below 1, ``progress`` is not
            callable, or ``select`` is given with a single tensor.
        SelectorError: ``select`` is malformed or matched nothing.

    >>> import torch
    >>> r = stats({"w": torch.tensor([1.0, 2.0, 0.0, float("nan")])})
    >>> r["w"].mean, r["w"].nan_count, r["w"].zero_fraction
    (1.0, 1, 0.25)
    """
    problems = []
    if not isinstance(chunk_bytes, int) or chunk_bytes < 64:
        problems.append(f"chunk_bytes must be an integer >= 64, got {chunk_bytes!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        problems.append(f"workers must be a positive integer, got {workers!r}")
    if _is_tensor(target) and select is not None:
        problems.append("select= needs named tensors; a single tensor has no names")
    if progress is not None and not callable(progress):
        problems.append(f"progress must be callable, got {type(progress).__name__}")
    if problems:
        raise UsageError("; ".join(problems))
    source, items, release = _items(target, select)
    seen: set[Any] = set()
    total = 0
    for _, key, _, nbytes in items:  # each tied tensor is read once
        if key is None or key not in seen:
            total += nbytes
            seen.add(key)
    report = StatsReport(source, [])
    torch = sys.modules.get("torch")  # set when the target holds torch tensors
    done = 0
    sharded: list[tuple[int, _Tensor]] = []
    fused = _measure.fused_wanted(total)
    # numpy's kernel holds the GIL between its short passes: more threads only slow it
    workers = workers or (min(torch.get_num_threads() if torch else os.cpu_count() or 1, MAX_WORKERS) if fused else 1)
    with torch.no_grad() if torch else contextlib.nullcontext(), _Runner(workers, chunk_bytes, fused) as run:
        for tensor, nbytes in run(_load(items, report)):
            if nbytes is None:  # the tensor's last chunk is in
                if tensor.sharded:
                    sharded.append((len(report.tensors), tensor))
                report.tensors.append(tensor.result())
                report.nbytes += tensor.nbytes
                release(tensor.name)
                continue
            done += nbytes
            if progress is not None:
                progress(done, total, tensor.name)
    if sharded:
        _combine_ranks(report, sharded)
    return report


def _holds_its_share(t: Any) -> bool:
    """Whether this rank measures its shard of ``t``: once per replica group (coordinate 0 of
    every mesh dimension ``t`` is replicated over), so replicated pieces are counted once."""
    coordinate = t.device_mesh.get_coordinate()
    if coordinate is None:  # not in the mesh
        return False
    return all(c == 0 for c, p in zip(coordinate, t.placements) if type(p).__name__ == "Replicate")


def _combine_ranks(report: StatsReport, sharded: list[tuple[int, _Tensor]]) -> None:
    """Whole-tensor statistics of sharded tensors: every rank's moments, combined (one collective)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [tensor.partial() for _, tensor in sharded])
    for i, (row, tensor) in enumerate(sharded):
        tensor.combine([ranks[i] for ranks in gathered])
        report.tensors[row] = tensor.result()


# ---------------------------------------------------------------- what to measure

_Item = tuple[str, Any, Callable[[], Any], int]  # name, tie key or None, load, nbytes


def _is_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor (without importing torch: none exists before it is)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _is_module(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.nn.Module)


def _is_checkpoint(target: Any) -> bool:
    """Whether ``target`` looks like an opened checkpoint: tensor infos by key, and ``.tensor``."""
    return (callable(getattr(target, "tensor", None)) and hasattr(target, "keys")
            and not _is_tensor(target) and not _is_module(target))


def _items(target: Any, selector: Selector | None) -> tuple[str, list[_Item], Callable[[str], None]]:
    """``(source, items, release)``: what to measure, in order, each loadable on its own; and
    what to call once a tensor is measured (a checkpoint's pages are dropped from memory)."""
    keep: Callable[[str], None] = lambda _name: None  # noqa: E731
    if _is_tensor(target):
        return "tensor", [("", None, _const(target), _nbytes(target))], keep
    opened = isinstance(target, (str, os.PathLike))
    if opened:
        from .checkpoint import open as open_checkpoint

        target = open_checkpoint(target)
    wanted = None if selector is None else set(select_names(target, selector, buffers=True))
    if _is_module(target):
        from .tables import module_tensors, storage_key

        items = [(full, storage_key(t), _const(t), _nbytes(t))
                 for full, *_, t, _is_param in module_tensors(target)
                 if wanted is None or full in wanted]
        return type(target).__name__, items, keep
    if _is_checkpoint(target):
        from .io._arrays import MappedArrays

        arrays = MappedArrays(target)
        items = []
        for name in target.keys():
            if wanted is None or name in wanted:
                info = target[name]
                storage = getattr(info, "storage", None)
                items.append((name, None if storage is None else ("storage", storage),
                              _lazy(target, arrays, name), int(getattr(info, "nbytes", 0))))

        def release(name: str, ckpt: Any = target) -> None:
            arrays.release(name)  # our own map of the file
            if opened:  # tensors of a checkpoint the caller holds may have been written to: kept
                ckpt.release(name)

        return str(getattr(target, "path", None) or type(target).__name__), items, release
    if isinstance(target, Mapping):
        bad = [f"{k!r} is {type(v).__name__}" for k, v in target.items() if not _is_tensor(v)]
        if bad:
            raise UsageError("stats() needs every value of a mapping to be a tensor; "
                            + "; ".join(bad[:10]))
        from .tables import storage_key

        return "state dict", [(k, storage_key(v), _const(v), _nbytes(v))
                              for k, v in target.items() if wanted is None or k in wanted], keep
    raise UsageError(f"stats() takes an nn.Module, a mapping of tensors, a checkpoint or a tensor, "
                    f"not {type(target).__name__}")


def _load(items: list[_Item], report: StatsReport) -> Iterator[tuple[str, Any]]:
    """The tensors to measure, loaded one at a time; ties and unreadable ones go to ``report``."""
    first: dict[Any, str] = {}
    for name, key, load, _ in items:
        if key is not None and key in first:  # tied: known before loading anything
            report.aliases[name] = first[key]
            continue
        t = load()
        why = _unreadable(t)
        if why:
            report.skipped[name] = why
            continue
        if key is not None:
            first[key] = name
        yield name, t


def _const(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: t


class _Stored(NamedTuple):
    """A checkpoint tensor read as a numpy array of its stored elements (no torch)."""

    array: np.ndarray
    dtype: str  # the torch dtype name
    shape: tuple[int, ...]
    arrays: Any  # the `MappedArrays` it came from (whose pages may be dropped once read)


def _lazy(ckpt: Any, arrays: Any, name: str) -> Callable[[], Any]:
    def load() -> Any:
        array = arrays.get(name)
        if array is None:  # not one mapped run: torch reads it
            return ckpt.tensor(name)
        info = ckpt[name]
        return _Stored(array, info.dtype, tuple(info.shape), arrays)
    return load


def _nbytes(t: torch.Tensor) -> int:
    """Bytes that will be read (this rank's shard of a DTensor): none for a tensor without readable data."""
    if _unreadable(t):
        return 0
    if _is_dtensor(t):
        t = t.to_local()  # type: ignore[attr-defined]
    return t.numel() * t.element_size()


def _unreadable(t: Any) -> str:
    if isinstance(t, _Stored):
        return _unsupported_name(t.dtype)
    from torch import nn

    if nn.parameter.is_lazy(t):
        return "uninitialized lazy parameter"
    if t.device.type == "meta":
        return "meta tensor: no data"
    if _is_dtensor(t) and t.to_local().numel() != t.numel():  # type: ignore[attr-defined]
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return "sharded DTensor without a process group: measure shards with t.to_local()"
        if any(type(p).__name__ not in ("Shard", "Replicate") for p in t.placements):  # type: ignore[attr-defined]
            return f"DTensor with placements {t.placements}: no rank holds a slice of its value"  # type: ignore
    return _unsupported(t)


def _unsupported(t: torch.Tensor) -> str:
    return _unsupported_name(_dtype_name(t.dtype))


def _unsupported_name(dtype: str) -> str:
    if dtype in _UNSUPPORTED:
        return f"dtype {dtype} cannot be converted for measuring"
    return ""


_UNSUPPORTED = {"float4_e2m1fn_x2", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2", "uint1", "int1"}


# ---------------------------------------------------------------- the one pass


# 64-bit values need float64 to keep their digits; everything narrower fits float32
_WIDE = _measure.WIDE
# dtypes numpy reads directly (others are converted by torch, or by a bit shift for bfloat16)
_NUMPY = {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"}


class _Tensor:
    """One tensor being measured: its chunks' contributions folded in with Chan's update."""

    def __init__(self, name: str, t: Any) -> None:
        self.moments = _measure.Moments()
        self.release_piece: Callable[[Any], None] | None = None  # drops a measured piece's pages
        if isinstance(t, _Stored):  # numpy: the stored elements of a checkpoint tensor
            self.name, self.shape, self.dtype = name, t.shape, t.dtype
            self.release_piece = t.arrays.release_view
            self.numel, self.nbytes, self.sharded = t.array.size, t.array.nbytes, False
            data = t.array
            if data.dtype.kind == "c":  # real and imaginary parts
                data = data.view(data.real.dtype) if data.ndim and data.flags.c_contiguous else \
                    np.stack([data.real, data.imag], axis=-1)
            self.data: Any = data
            self.elements = data.size
            self.work: Any = _measure.work_dtype(self.dtype)
            return
        import torch

        self.name, self.numel, self.shape = name, t.numel(), tuple(t.shape)
        self.dtype, self.nbytes = _dtype_name(t.dtype), _nbytes(t)
        self.sharded = _is_dtensor(t) and t.to_local().numel() != t.numel()  # type: ignore[attr-defined]
        if _is_dtensor(t):
            t = t.to_local() if not self.sharded or _holds_its_share(t) else t.to_local()[:0]  # type: ignore
        t = t.detach()
        if t.is_quantized:
            t = t.dequantize()
        if t.is_complex():  # a lazily conjugated view is copied: its stored values differ
            t = torch.view_as_real(t.resolve_conj())
        self.data = t.resolve_neg()
        self.work = np.float64 if _dtype_name(self.data.dtype) in _WIDE else np.float32
        self.elements = self.data.numel()

    def partial(self) -> tuple[_Chunk, int]:
        """This rank's moments and element count, to combine with the other ranks'."""
        m = self.moments
        return _Chunk(m.n, m.mean, m.m2, m.lo, m.hi, m.zeros, m.nans, m.infs), self.elements

    def combine(self, partials: list[tuple[_Chunk, int]]) -> None:
        """Become the whole tensor's statistics from every rank's `partial`, in rank order."""
        self.moments = _measure.Moments()
        for chunk, _ in partials:
            self.add(_Chunk(*chunk))
        self.elements = sum(elements for _, elements in partials)

    def add(self, c: _Chunk) -> None:
        self.moments.add(c)

    def result(self) -> TensorStats:
        m, nan = self.moments, math.nan
        n = m.n
        lo, hi = (m.lo, m.hi) if n else (nan, nan)
        elements = self.elements
        return TensorStats(
            self.name, self.dtype, self.shape, self.numel,
            mean=m.mean if n else nan,
            std=math.sqrt(m.m2 / n) if n else nan,
            min=lo, max=hi, absmax=max(abs(lo), abs(hi)),
            l2=math.sqrt(m.m2 + n * m.mean * m.mean) if n else nan,
            zero_fraction=m.zeros / elements if elements else nan,
            nan_count=m.nans, inf_count=m.infs)


class _Runner:
    """Measures the chunks of a stream of tensors on a few threads, handing results back in order.

    ``run(tensors)`` yields ``(tensor, nbytes)`` after each chunk and ``(tensor, None)`` once a
    tensor is complete. At most ``2 × workers`` chunks are in flight, so copies made for
    non-contiguous tensors stay bounded.
    """

    def __init__(self, workers: int, chunk_bytes: int, fused: bool = False) -> None:
        self.workers, self.chunk_bytes, self.fused = workers, chunk_bytes, fused
        self.scratch = _Scratch()
        self.pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> _Runner:
        if self.workers > 1:
            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="weightsmith-stats")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
        self.scratch = _Scratch()  # let the buffers go

    def __call__(self, tensors: Iterable[tuple[str, Any]]) -> Iterator[tuple[_Tensor, int | None]]:
        pending: deque[tuple[_Tensor, Future[tuple[int, _Chunk]] | None, Any]] = deque()
        for tensor, piece in self._chunks(tensors):
            pending.append((tensor, None if piece is None else self._submit(tensor, piece), piece))
            while pending and (len(pending) > 2 * self.workers or pending[0][1] is None):
                yield self._finish(*pending.popleft())
        while pending:
            yield self._finish(*pending.popleft())

    def _chunks(self, tensors: Iterable[tuple[str, Any]]) -> Iterator[tuple[_Tensor, Any]]:
        for name, t in tensors:
            tensor = _Tensor(name, t)
            step = max(1, self.chunk_bytes // (8 if tensor.work == np.float64 else 4))
            if isinstance(tensor.data, np.ndarray):
                if tensor.dtype == "float4_e2m1fn_x2":
                    step = max(1, step // 2)  # two values a byte
                yield from ((tensor, piece) for piece in _measure.pieces(tensor.data, step))
            else:
                yield from ((tensor, piece) for piece in _pieces(tensor.data, step))
            yield tensor, None

    def _submit(self, tensor: _Tensor, piece: Any) -> Future[tuple[int, _Chunk]]:
        if self.pool is not None:
            return self.pool.submit(_measure_chunk, piece, self.scratch, tensor.dtype, self.fused)
        done: Future[tuple[int, _Chunk]] = Future()
        done.set_result(_measure_chunk(piece, self.scratch, tensor.dtype, self.fused))
        return done

    @staticmethod
    def _finish(tensor: _Tensor, outcome: Future[tuple[int, _Chunk]] | None, piece: Any
                ) -> tuple[_Tensor, int | None]:
        if outcome is None:
            return tensor, None
        nbytes, chunk = outcome.result()
        tensor.add(chunk)
        if tensor.release_piece is not None:  # read: its pages may go (they are read back if touched)
            tensor.release_piece(piece)
        return tensor, nbytes


def _measure_chunk(piece: Any, scratch: _Scratch, dtype: str = "", fused: bool = False) -> tuple[int, _Chunk]:
    """``(bytes read, contribution)`` of one 1-D piece (numpy stored elements, or torch)."""
    if isinstance(piece, np.ndarray):
        return piece.nbytes, _measure.moments(piece, scratch, dtype=dtype, fused=fused)
    nbytes = piece.numel() * piece.element_size()
    if piece.device.type == "cpu":
        return nbytes, _measure.moments(_as_numpy(piece, scratch), scratch, fused=fused)
    return nbytes, _torch_chunk(piece, scratch)


class _Scratch(Scratch):
    """`Scratch` buffers, and torch ones for chunks off the CPU."""

    def get(self, name: str, n: int, dtype: Any, device: Any = None) -> Any:
        """A numpy buffer (or a torch one, given a device) of ``n`` elements."""
        if device is None:
            return super().get(name, n, dtype)
        import torch

        buffers = self._local.__dict__.setdefault("devices", {})
        key = (name, dtype, device)
        buf = buffers.get(key)
        if buf is None or len(buf) < n:
            buf = buffers[key] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n]


def _as_numpy(piece: torch.Tensor, scratch: _Scratch) -> np.ndarray:
    """The piece as a float32 or float64 numpy array: a view when it is one, else a conversion."""
    import torch

    name = _dtype_name(piece.dtype)
    if name in ("float32", "float64"):
        return piece.numpy()
    m = piece.numel()
    buf = scratch.get("upcast", m, np.float64 if name in _WIDE else np.float32)
    if name == "bfloat16":  # bfloat16 is the top half of a float32
        return _measure.widen(piece.view(torch.int16).numpy(), name, lambda n: buf)
    elif name in _NUMPY:
        np.copyto(buf, piece.numpy(), casting="unsafe")
    else:  # float8 and other kinds numpy lacks
        torch.from_numpy(buf).copy_(piece)
    return buf


def _torch_chunk(w: torch.Tensor, scratch: _Scratch) -> _Chunk:
    """The same measurement with torch ops, for tensors off the CPU; one sync per chunk."""
    import torch

    work = torch.float64 if _dtype_name(w.dtype) in _WIDE else torch.float32
    m = w.numel()
    if w.dtype != work:
        w = scratch.get("upcast", m, work, w.device).copy_(w)
    s, lo, hi, ss, nonzero = torch.stack([
        p.double() for p in (w.sum(), *torch.aminmax(w), torch.dot(w, w), torch.count_nonzero(w))
    ]).tolist()
    if not math.isfinite(s):
        finite = w[torch.isfinite(w)]
        nans = int(torch.isnan(w).sum())
        return _torch_nonfinite(finite, m, nans)
    zeros = m - int(nonzero)
    if lo == hi:
        return _Chunk(m, lo, 0.0, lo, hi, zeros)
    mean = s / m
    if m * mean * mean > _measure.CANCELLATION * ss:
        k = float(np.float32(mean)) if work == torch.float32 else mean
        d = torch.sub(w, k, out=scratch.get("shifted", m, work, w.device))
        ss, mean_k = torch.dot(d, d).item(), mean - k
    else:
        mean_k = mean
    return _Chunk(m, mean, max(ss - m * mean_k * mean_k, 0.0), lo, hi, zeros)


def _torch_nonfinite(finite: torch.Tensor, m: int, nans: int) -> _Chunk:
    import torch

    f = finite.double()
    zeros = int((f == 0).sum())
    if not f.numel():
        return _Chunk(0, 0.0, 0.0, math.inf, -math.inf, zeros, nans, m - nans)
    mean = f.mean()
    lo, hi = torch.aminmax(f)
    return _Chunk(f.numel(), mean.item(), float(((f - mean) ** 2).sum()), lo.item(), hi.item(),
                  zeros, nans, m - f.numel() - nans)


def _pieces(t: torch.Tensor, step: int) -> Iterator[torch.Tensor]:
    """1-D pieces of at most ``step`` elements covering ``t``: views when the memory is dense
    (in any dim order, since the statistics do not depend on order), else copies of few rows."""
    if t.dim() == 0:
        yield t.reshape(1)
        return
    if t.numel() == 0:
        return
    t = _dense_order(t)
    if t.is_contiguous():
        flat = t.view(-1)
        for i in range(0, flat.numel(), step):
            yield flat[i:i + step]
        return
    row = t[0].numel()
    if row > step:
        for i in range(t.shape[0]):
            yield from _pieces(t[i], step)
        return
    rows = step // row
    for i in range(0, t.shape[0], rows):
        yield t[i:i + rows].reshape(-1)  # a copy of at most `step` elements


def _dense_order(t: torch.Tensor) -> torch.Tensor:
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    permuted = t.permute(order)
    return permuted if permuted.is_contiguous() else t
