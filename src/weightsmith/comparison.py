"""`diff`: how two checkpoints differ, in keys, shapes, dtypes, and how far each tensor moved.

Keys are paired the way warm-starting pairs them: wrapper prefixes aligned (``module.``,
``_orig_mod.``...), then one-to-one rename rules. Tensor pairs are streamed: one pair is read
at a time, in cache-sized chunks measured by a few threads (float32 BLAS sums for data of 32
bits or fewer, float64 for wider), the chunks' sums accumulated in float64 (the kernel is `weightsmith._measure`). Files are read as
numpy arrays over the mapped file, so comparing two files never imports torch. Pages of a
checkpoint opened from a path are released once its pair is done, so comparing two 2 GB files
needs memory for about one pair.

A pair is decided without reading it when both files store a CRC-32 of the tensor's bytes
(``weightsmith.save`` writes them): equal checksums, shapes and dtypes count as identical.
A CRC-32 is no cryptographic hash: two different tensors with equal checksums would be missed
(about one chance in four billion per pair), and the stored checksums are trusted, not
re-checked against the data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np

from . import _measure
from ._measure import Part as _Part
from ._result import Result
from ._tensors import dtype_name as _dtype_name
from .errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, UsageError, WeightsmithError
from .warmstart.keymap import align_prefixes, as_rules
from .listing import block_name, fold_name
from .selectors import Selector, select as select_names

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["diff", "Diff", "TensorDiff", "SpecChange", "Rollup", "block_name", "CHUNK_ELEMENTS"]

Progress = Callable[[int, int, str], None]

# Elements per piece and side handed to a worker thread: 4 MiB of float32, few enough hand-offs
# that threads cost little.
CHUNK_ELEMENTS = 1024 * 1024
# Elements per block within a piece: three blocks of float32 (both sides and their difference)
# fit a core's L2 cache, so only the first pass over a block reads memory
BLOCK_ELEMENTS = _measure.BLOCK_ELEMENTS
_WORKERS = max(1, min(4, os.cpu_count() or 1))


# ---------------------------------------------------------------- results


@dataclass
class TensorDiff:
    """How far one tensor present on both sides moved.

    Metrics are over the elements finite on both sides; NaN and Inf are counted apart.

    Attributes:
        key: its name in ``b``.
        key_a: its name in ``a`` when that differs (a wrapper prefix, a rename rule).
        shape: the shape (the same on both sides).
        dtype_a, dtype_b: the dtypes; values are compared in a common precision when they differ.
        identical: every element equal (NaN counts as equal to NaN, ``-0.0`` to ``0.0``).
        method: ``"compared"`` (the data was read), ``"checksum"`` (equal stored CRC-32s; the
            data was not read) or ``"same data"`` (both sides are the same memory or file entry).
        max_abs: the largest ``|a - b|``.
        rel_l2: ``||a - b|| / ||a||`` (``inf`` when ``a`` is all zero and ``b`` is not).
        cosine: cosine similarity of ``a`` and ``b`` (1 when both are all zero, ``nan`` when
            exactly one is).
        changed: elements with ``|a - b| > atol + rtol * |a|``, plus elements that are NaN or
            Inf on one side and not the same on the other.
        changed_fraction: ``changed`` over the number of elements.
        nan_a, nan_b: NaN counts on each side (``None`` when the data was not read).
        l2_a, l2_diff: ``||a||`` and ``||a - b||`` (over elements finite on both sides).
        score: how much it moved, for ranking: ``||a - b||`` relative to the larger of
            ``||a||`` and the model's typical scale for that many elements (the RMS of every
            ``a`` compared, times the square root of its element count). Large tensors score
            their relative change; a tiny bias, or one that started at zero (whose relative
            change is ``inf``), scores its absolute change in units of the model's scale
            instead of topping the list.
    """

    key: str
    key_a: str | None
    shape: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    numel: int
    identical: bool
    method: str
    max_abs: float
    rel_l2: float
    cosine: float
    changed: int
    changed_fraction: float
    nan_a: int | None
    nan_b: int | None
    l2_a: float = 0.0
    l2_diff: float = 0.0
    score: float = 0.0


@dataclass
class SpecChange:
    """A key on both sides whose shape or dtype differs."""

    key: str
    key_a: str | None
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str


@dataclass
class Rollup:
    """Changes summed over a group of tensors: a block (``encoder.layer.5``, indices kept), a
    layer family (``layers.#.mlp.weight``) or a top-level module (``encoder``).
    ``rel_l2`` is the group's ``||a - b|| / ||a||`` over the tensors read, taken together."""

    name: str
    tensors: int = 0
    changed_tensors: int = 0
    numel: int = 0
    changed: int = 0
    changed_fraction: float = 0.0
    max_abs: float = 0.0
    max_rel_l2: float = 0.0
    rel_l2: float = 0.0


@dataclass
class Diff(Result):
    """What `diff` found between ``a`` and ``b``.

    Attributes:
        a, b: what was compared (paths, or ``<state dict>`` / ``<ModelClass>``).
        atol, rtol: the tolerance: an element changed when ``|a - b| > atol + rtol * |a|``.
        only_a: keys of ``a`` (its own names) with no counterpart in ``b``.
        only_b: keys of ``b`` with no counterpart in ``a``.
        shape_changes: pairs whose shapes differ (their values are not compared).
        dtype_changes: pairs whose dtypes differ (their values are compared).
        tensors: every compared pair, in ``a``'s order.
        layers: changes rolled up per layer family (layer indices folded to ``#``).
        modules: changes rolled up per top-level module.
        blocks: changes rolled up per block, indices kept: a key's path up to its first
            index (``encoder.layer.5``), else its module (``embeddings.LayerNorm``), so one
            changed layer shows as one row.
        prefix: how ``a``'s keys were aligned to ``b``'s (``strip 'module.'``), or ``""``.
        renamed: ``a`` key -> ``b`` key for keys renamed by a rule.
        skipped: pairs that could not be compared (no data, unsupported dtype) -> why.
        top: how many of the most changed tensors the rendering lists.
    """

    SCHEMA: ClassVar[str] = "weightsmith.diff/1"

    a: str
    b: str
    atol: float
    rtol: float
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    shape_changes: list[SpecChange] = field(default_factory=list)
    dtype_changes: list[SpecChange] = field(default_factory=list)
    tensors: list[TensorDiff] = field(default_factory=list)
    layers: list[Rollup] = field(default_factory=list)
    modules: list[Rollup] = field(default_factory=list)
    blocks: list[Rollup] = field(default_factory=list)
    prefix: str = ""
    renamed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    top: int = 10

    @property
    def equal(self) -> bool:
        """Same keys, shapes and dtypes, and every tensor equal within the tolerance."""
        return not (self.only_a or self.only_b or self.shape_changes or self.dtype_changes
                    or self.skipped or any(t.changed for t in self.tensors))

    @property
    def changed(self) -> list[TensorDiff]:
        """The compared tensors with elements changed beyond the tolerance."""
        return [t for t in self.tensors if t.changed]

    def most_changed(self, n: int | None = None) -> list[TensorDiff]:
        """Tensors that are not identical, most changed first (by ``score``, see `TensorDiff`)."""
        moved = [t for t in self.tensors if not t.identical]
        moved.sort(key=lambda t: (t.changed > 0, _num(t.score), t.changed_fraction, _num(t.max_abs)),
                   reverse=True)
        return moved if n is None else moved[:n]

    @property
    def summary(self) -> str:
        """One line: equal or not, and why."""
        n = len(self.tensors)
        by_crc = sum(t.method == "checksum" for t in self.tensors)
        crc = f" ({by_crc} decided by checksum)" if by_crc else ""
        if self.equal:
            same = sum(t.identical for t in self.tensors)
            if same == n:
                return f"equal: {n} tensor{'s' * (n != 1)} identical{crc}"
            return (f"equal within atol={self.atol:g}, rtol={self.rtol:g}: {n} tensors, "
                    f"{same} identical{crc}")
        parts = [f"{len(self.changed)} of {n} compared tensors changed"]
        for count, what in ((len(self.only_a), "only in a"), (len(self.only_b), "only in b"),
                            (len(self.shape_changes), "shape change"),
                            (len(self.dtype_changes), "dtype change"),
                            (len(self.skipped), "not comparable")):
            if count:
                parts.append(f"{count} {what}{'s' * (count != 1 and what.endswith('change'))}")
        return "different: " + ", ".join(parts) + crc

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the schema, ``equal`` and ``summary``, then every field."""
        body = super().to_dict()
        return {"schema": body.pop("schema"), "equal": self.equal, "summary": self.summary, **body}

    def _rich_(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        parts: list[Any] = [Text(self.summary, style="bold")]
        notes = [f"a: {self.a}", f"b: {self.b}"]
        if self.prefix:
            notes.append(f"keys of a aligned to b: {self.prefix}")
        if self.renamed:
            notes.append(f"{len(self.renamed)} key(s) renamed by rules")
        parts.append(Text("\n".join(notes)))
        for label, keys in ((f"only in a ({len(self.only_a)})", self.only_a),
                            (f"only in b ({len(self.only_b)})", self.only_b)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... and {len(keys) - 20} more" if len(keys) > 20 else "")
                parts.append(Text(f"{label}: {shown}"))
        specs = self.shape_changes + self.dtype_changes
        if specs:
            table = Table(title="shape and dtype changes", title_justify="left")
            for col in ("name", "shape a", "shape b", "dtype a", "dtype b"):
                table.add_column(col, no_wrap=col == "name")
            for c in specs:
                table.add_row(_both_names(c.key, c.key_a), str(c.shape_a), str(c.shape_b), c.dtype_a, c.dtype_b)
            parts.append(table)
        moved = self.most_changed()
        if moved:
            shown = moved[:max(self.top, 0)]
            table = Table(title=f"most changed tensors ({len(shown)} of {len(moved)} not identical)",
                          title_justify="left")
            table.add_column("name", no_wrap=True)
            for col in ("shape", "score", "max |a-b|", "rel L2", "cosine", "changed", "NaN a/b"):
                table.add_column(col, justify="left" if col == "shape" else "right")
            for t in shown:
                nans = "-" if t.nan_a is None else f"{t.nan_a}/{t.nan_b}"
                table.add_row(_both_names(t.key, t.key_a), str(t.shape), f"{t.score:.4g}", f"{t.max_abs:.4g}",
                              f"{t.rel_l2:.4g}", f"{t.cosine:.6f}", f"{t.changed_fraction:.2%}", nans)
            parts.append(table)
        if self.skipped:
            parts.append(Text("not compared: " + "; ".join(f"{k}: {why}" for k, why in self.skipped.items())))
        # a rollup is worth a table when it groups something and something changed
        if any(r.changed_tensors for r in self.blocks) and len(self.blocks) > 1:
            parts.append(_rollup_table("per block (indices kept)", self.blocks))
        return Group(*parts)


def _num(x: float) -> float:
    return -1.0 if math.isnan(x) else x


def _both_names(key: str, key_a: str | None) -> str:
    return key if key_a is None else f"{key_a} -> {key}"


def _rollup_table(title: str, rows: list[Rollup]) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("name", no_wrap=True)
    for col in ("tensors", "changed tensors", "changed", "max |a-b|", "rel L2"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r.name, str(r.tensors), str(r.changed_tensors), f"{r.changed_fraction:.2%}",
                      f"{r.max_abs:.4g}", f"{r.rel_l2:.4g}")
    return table


# ---------------------------------------------------------------- the public function


def diff(
    a: str | os.PathLike[str] | Mapping[str, torch.Tensor] | nn.Module | Any,
    b: str | os.PathLike[str] | Mapping[str, torch.Tensor] | nn.Module | Any,
    *,
    rename: Any = (),
    atol: float = 0.0,
    rtol: float = 0.0,
    select: Selector | None = None,
    progress: Progress | None = None,
) -> Diff:
    """Compare two checkpoints, state dicts or models, tensor by tensor.

    Keys of ``a`` are aligned to ``b``'s as for warm-starting: wrapper prefixes first, then
    the one-to-one ``rename`` rules. For each pair the result gives the largest absolute
    difference, the relative L2 change, the cosine similarity, the fraction of elements
    changed beyond ``atol + rtol * |a|`` and the NaN counts (a NaN on one side only is a
    change; NaN on both is not). Pairs whose files both store CRC-32 checksums are decided
    without reading them when the checksums are equal.

    Args:
        a, b: paths (anything `weightsmith.open` reads), opened `Checkpoint` objects, state
            dicts or models. Pages of files opened here are released as the comparison goes;
            an already opened `Checkpoint` is read but its pages are left alone.
        rename: rename rules from ``a``'s names to ``b``'s, one source to one target:
            `Rule` objects, ``(source, target)`` tuples, a mapping, or a rules file.
        atol, rtol: the tolerance; ``0`` compares exactly.
        select: a selector on ``b``'s names (``a``'s keys as aligned); only those are compared.
        progress: called as ``progress(done_bytes, total_bytes, key)`` while tensors are read.

    Returns:
        a `Diff`; ``Diff.equal`` says whether the two match within the tolerance.

    Raises:
        UsageError: bad tolerances, rules that are not one-to-one, or two keys of ``a``
            landing on one name; all listed at once.
        CheckpointError: a path cannot be opened.

    >>> import torch, weightsmith
    >>> a = {"0.weight": torch.ones(2, 2)}
    >>> weightsmith.diff(a, {"0.weight": torch.full((2, 2), 1.5)}).tensors[0].max_abs
    0.5
    """
    problems = [f"{name} must be a number >= 0, got {value!r}" for name, value in (("atol", atol), ("rtol", rtol))
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0]
    try:
        rules = as_rules(rename)
    except WeightsmithError as e:
        problems.append(str(e))
        rules = ()
    problems += [f"rule {r} is not one-to-one (diff renames one key to one key)" for r in rules
                 if len(r.sources) != 1 or len(r.targets) != 1]
    side_a, side_b = _open_sides(a, b, problems)
    try:
        plan = _pair(side_a, side_b, rules, select)
        return _compare(side_a, side_b, plan, float(atol), float(rtol), progress)
    finally:
        side_a.close()
        side_b.close()


# ---------------------------------------------------------------- sides


@dataclass
class _Side:
    """One side of a diff: names, shapes and dtypes, and tensors on demand."""

    name: str
    specs: dict[str, tuple[tuple[int, ...], str, int]]  # key -> (shape, dtype, nbytes)
    storage: dict[str, Any]  # key -> identity of its data, equal for tied keys (None: unknown)
    get: Callable[[str], Any]  # a torch tensor, or a `_Stored` array
    release: Callable[[str], None] = lambda _key: None
    checksums: dict[str, str] = field(default_factory=dict)
    close: Callable[[], None] = lambda: None


def _open_sides(a: Any, b: Any, problems: list[str]) -> tuple[_Side, _Side]:
    sides: list[_Side] = []
    errors: list[Exception] = []
    for label, obj in (("a", a), ("b", b)):
        try:
            sides.append(_side(obj, label))
        except WeightsmithError as e:
            errors.append(e)
    if problems or errors:
        for side in sides:
            side.close()
        if not problems and len(errors) == 1:
            raise errors[0]
        text = "; ".join([*problems, *map(str, errors)])
        if problems:
            raise UsageError(f"cannot diff: {text}")
        if not problems and len({(type(e), str(e)) for e in errors}) == 1:  # one file, given twice
            raise errors[0]
        kind = CheckpointNotFoundError if all(isinstance(e, CheckpointNotFoundError) for e in errors) \
            else CheckpointError
        raise kind(text) from errors[0]
    return sides[0], sides[1]


def _side(obj: Any, label: str) -> _Side:
    from .checkpoint import Checkpoint, open as open_checkpoint

    if isinstance(obj, (str, os.PathLike)):
        ckpt = open_checkpoint(Path(obj))
        return _checkpoint_side(ckpt, owned=True)
    if isinstance(obj, Checkpoint):
        return _checkpoint_side(obj, owned=False)
    torch = sys.modules.get("torch")  # no torch object exists before torch is imported
    if torch is not None and isinstance(obj, torch.nn.Module):
        return _tensor_side(obj.state_dict(keep_vars=False), f"<{type(obj).__name__}>")
    if isinstance(obj, Mapping):
        bad = [f"{k!r} is {type(v).__name__}" for k, v in obj.items()
               if not isinstance(k, str) or torch is None or not isinstance(v, torch.Tensor)]
        if bad:
            raise UsageError(f"{label}: every entry of a state dict must map a string to a tensor; "
                             + "; ".join(bad[:10]))
        return _tensor_side(obj, "<state dict>")
    raise UsageError(f"{label}: cannot diff a {type(obj).__name__}; give a path, a checkpoint, "
                     "a state dict or a model")


class _Stored(NamedTuple):
    """A checkpoint tensor read as a numpy array of its stored elements (no torch)."""

    array: np.ndarray
    dtype: str  # the torch dtype name


def _checkpoint_side(ckpt: Any, *, owned: bool) -> _Side:
    from .io._arrays import MappedArrays

    reader = ckpt.reader
    specs = {k: (tuple(i.shape), i.dtype, i.nbytes) for k, i in ckpt.items()}
    storage = {k: (id(reader), i.storage or k) for k, i in ckpt.items()}
    arrays = MappedArrays(ckpt)

    def get(key: str) -> Any:
        array = arrays.get(key)
        return ckpt.tensor(key) if array is None else _Stored(array, specs[key][1])

    def release(key: str) -> None:
        arrays.release(key)
        ckpt.release(key)

    def close() -> None:
        arrays.close()
        if owned:
            ckpt.close()

    return _Side(str(ckpt.path), specs, storage, get, release=release if owned else (lambda _key: None),
                 checksums=_checksums(reader), close=close)


def _checksums(reader: Any) -> dict[str, str]:
    """Key -> CRC-32 stored by ``weightsmith.save`` (tied keys share their stored key's)."""
    from .io.safetensors import CHECKSUMS_KEY

    out: dict[str, str] = {}
    shards = getattr(reader, "shards", None)
    for r in shards.values() if isinstance(shards, Mapping) else (reader,):
        try:
            crcs = json.loads(r.metadata.get(CHECKSUMS_KEY) or "{}")
        except ValueError:
            continue  # unreadable checksums only cost the shortcut
        except RecursionError as e:  # the parser recurses per level: no checksum list nests
            raise CorruptCheckpointError(
                f"{r.path}: metadata {CHECKSUMS_KEY!r} is nested too deeply to be a checksum list; "
                "rewrite the file without it (weightsmith convert)") from e
        if not isinstance(crcs, dict):
            continue
        out.update({k: v for k, v in crcs.items() if isinstance(v, str)})
        out.update({alias: crcs[stored] for alias, stored in r.aliases().items()
                    if isinstance(crcs.get(stored), str)})
    return out


def _tensor_side(state: Mapping[str, torch.Tensor], name: str) -> _Side:
    specs = {k: (tuple(t.shape), _dtype_name(t.dtype), t.numel() * t.element_size()) for k, t in state.items()}
    storage = {k: _memory_id(t) for k, t in state.items()}
    return _Side(name, specs, storage, state.__getitem__)


def _memory_id(t: torch.Tensor) -> Any:
    import torch

    if t.device.type == "meta" or t.numel() == 0 or t.layout != torch.strided:
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return ("memory", str(t.device), ptr, t.storage_offset(), tuple(t.stride()), t.dtype)


# ---------------------------------------------------------------- pairing


@dataclass
class _Plan:
    pairs: list[tuple[str, str]]  # (a key, b key), in a's order
    only_a: list[str]
    only_b: list[str]
    prefix: str
    renamed: dict[str, str]


def _pair(side_a: _Side, side_b: _Side, rules: tuple[Any, ...], select: Selector | None) -> _Plan:
    prefix = align_prefixes(side_a.specs, side_b.specs)
    names: dict[str, str] = {}
    renamed: dict[str, str] = {}
    for key in side_a.specs:
        name = prefix(key)
        for rule in rules:
            new = rule.rename(name)
            if new is not None:
                renamed[key], name = new, new
                break
        names[key] = name
    claimed: dict[str, list[str]] = {}
    for key, name in names.items():
        claimed.setdefault(name, []).append(key)
    clashes = [f"{', '.join(map(repr, keys))} all become {name!r}" for name, keys in claimed.items() if len(keys) > 1]
    if clashes:
        raise UsageError("cannot diff: keys of a collide after aligning prefixes and renaming: "
                         + "; ".join(clashes[:10]) + "; add a rename rule to tell them apart")
    wanted: set[str] | None = None
    if select is not None:
        universe = {**{name: side_a.specs[key] for key, name in names.items()}, **side_b.specs}
        wanted = set(select_names(universe, select))
    keep = (lambda _name: True) if wanted is None else wanted.__contains__
    pairs = [(k, n) for k, n in names.items() if n in side_b.specs and keep(n)]
    only_a = [k for k, n in names.items() if n not in side_b.specs and keep(n)]
    only_b = [k for k in side_b.specs if k not in claimed and keep(k)]
    described = prefix.describe()
    return _Plan(pairs, only_a, only_b, "" if described == "none" else described,
                 {k: v for k, v in renamed.items() if keep(v)})


# ---------------------------------------------------------------- comparing


def _compare(side_a: _Side, side_b: _Side, plan: _Plan, atol: float, rtol: float,
             progress: Progress | None) -> Diff:
    result = Diff(side_a.name, side_b.name, atol, rtol, only_a=plan.only_a, only_b=plan.only_b,
                  prefix=plan.prefix, renamed=plan.renamed)
    todo: list[tuple[str, str]] = []
    for ka, kb in plan.pairs:
        shape_a, dtype_a, _ = side_a.specs[ka]
        shape_b, dtype_b, _ = side_b.specs[kb]
        if shape_a != shape_b or dtype_a != dtype_b:
            change = SpecChange(kb, None if ka == kb else ka, shape_a, shape_b, dtype_a, dtype_b)
            (result.shape_changes if shape_a != shape_b else result.dtype_changes).append(change)
        if shape_a == shape_b:
            todo.append((ka, kb))
    total = sum(side_a.specs[ka][2] + side_b.specs[kb][2] for ka, kb in todo)
    done = 0
    known: dict[tuple[Any, Any], TensorDiff] = {}  # tied pairs are read once
    fused = _measure.fused_wanted(total)
    # numpy's kernel holds the GIL between its many short passes: a second thread only slows it
    with _Pool(_WORKERS if fused else 1, fused=fused) as pool:
        for ka, kb in todo:
            shape, dtype_a, nbytes_a = side_a.specs[ka]
            dtype_b, nbytes_b = side_b.specs[kb][1:]
            key_a = None if ka == kb else ka
            ident = (side_a.storage[ka], side_b.storage[kb])
            found = known.get(ident) if None not in ident else None
            entry: TensorDiff | str
            if found is not None:
                entry = dataclasses.replace(found, key=kb, key_a=key_a)
            elif ident[0] is not None and ident[0] == ident[1]:
                entry = _unread(kb, key_a, shape, dtype_a, dtype_b, "same data")
            elif dtype_a == dtype_b and _equal_checksums(side_a, side_b, ka, kb):
                entry = _unread(kb, key_a, shape, dtype_a, dtype_b, "checksum")
            else:
                def step(n: int, base: int = done, key: str = kb) -> None:
                    if progress is not None:
                        progress(base + n, total, key)

                entry = _measure_pair(side_a, side_b, ka, kb, atol, rtol, pool, step)
            if isinstance(entry, str):
                result.skipped[kb] = entry
            else:
                result.tensors.append(entry)
                if None not in ident:
                    known.setdefault(ident, entry)
            done += nbytes_a + nbytes_b
            if progress is not None:
                progress(done, total, kb)
    _score(result.tensors)
    result.layers = _rollup(result.tensors, fold_name)
    result.modules = _rollup(result.tensors, lambda key: key.split(".", 1)[0])
    result.blocks = _rollup(result.tensors, block_name)
    return result


def _score(tensors: list[TensorDiff]) -> None:
    """Set each tensor's ranking score: ``||a - b||`` over the larger of ``||a||`` and the
    model-wide RMS times the square root of its size (see `TensorDiff.score`)."""
    read = [t for t in tensors if t.method == "compared" and t.numel]
    sq, n = sum(t.l2_a ** 2 for t in read), sum(t.numel for t in read)
    rms = math.sqrt(sq / n) if n and math.isfinite(sq) else 0.0
    for t in tensors:
        floor = rms * math.sqrt(t.numel)
        scale = max(t.l2_a, floor)
        t.score = t.l2_diff / scale if scale > 0 else (math.inf if t.l2_diff > 0 else 0.0)


def _equal_checksums(side_a: _Side, side_b: _Side, ka: str, kb: str) -> bool:
    crc_a, crc_b = side_a.checksums.get(ka), side_b.checksums.get(kb)
    return crc_a is not None and crc_a == crc_b


def _unread(key: str, key_a: str | None, shape: tuple[int, ...], dtype_a: str, dtype_b: str,
            method: str) -> TensorDiff:
    return TensorDiff(key, key_a, shape, dtype_a, dtype_b, math.prod(shape), True, method,
                      0.0, 0.0, 1.0, 0, 0.0, None, None)


def _rollup(tensors: list[TensorDiff], group: Callable[[str], str]) -> list[Rollup]:
    rows: dict[str, Rollup] = {}
    sums: dict[str, list[float]] = {}
    for t in tensors:
        r = rows.setdefault(group(t.key), Rollup(group(t.key)))
        acc = sums.setdefault(r.name, [0.0, 0.0])
        acc[0] += t.l2_diff ** 2
        acc[1] += t.l2_a ** 2
        r.tensors += 1
        r.changed_tensors += t.changed > 0
        r.numel += t.numel
        r.changed += t.changed
        r.max_abs = max(r.max_abs, t.max_abs)
        if not math.isnan(t.rel_l2):
            r.max_rel_l2 = max(r.max_rel_l2, t.rel_l2)
    for r in rows.values():
        r.changed_fraction = r.changed / r.numel if r.numel else 0.0
        dd, aa = sums[r.name]
        r.rel_l2 = math.sqrt(dd / aa) if aa > 0 else (0.0 if dd == 0 else math.inf)
    return list(rows.values())


# ---------------------------------------------------------------- one pair, in chunks


def _measure_pair(side_a: _Side, side_b: _Side, ka: str, kb: str, atol: float, rtol: float,
                  pool: _Pool, step: Callable[[int], None]) -> TensorDiff | str:
    """The metrics of one pair, or why it cannot be compared."""
    ta, tb = side_a.get(ka), side_b.get(kb)
    try:
        why = _unreadable(ta) or _unreadable(tb)
        if why:
            return why
        (xa, da), (xb, db) = _comparable(ta, tb)
        if xa is None or xb is None:
            return f"cannot compare torch.{da} with torch.{db}"
        work = np.float64 if da in _measure.WIDE or db in _measure.WIDE else np.float32
        sums = [0.0, 0.0, 0.0, 0.0]
        max_abs, changed, nan_a, nan_b, differs = 0.0, 0, 0, 0, False
        done = 0
        for part, nbytes in pool.map(_measure.pair_pieces(xa, xb, CHUNK_ELEMENTS),
                                     lambda pa, pb: _measure_piece(pa, pb, da, db, work, atol, rtol, pool.scratch,
                                                                    pool.fused)):
            sums = [s + p for s, p in zip(sums, part[:4])]
            max_abs = max(max_abs, part.max_abs)
            changed += part.changed
            nan_a += part.nan_a
            nan_b += part.nan_b
            differs |= part.differs
            done += nbytes
            step(done)
    finally:
        del ta, tb
        side_a.release(ka)
        side_b.release(kb)
    dd, aa, bb, ab = sums
    numel = math.prod(side_b.specs[kb][0])
    rel = math.sqrt(dd / aa) if aa > 0 else (0.0 if dd == 0 else math.inf)
    if aa > 0 and bb > 0:
        cosine = max(-1.0, min(1.0, ab / math.sqrt(aa * bb)))
    else:
        cosine = 1.0 if aa == bb == 0 else math.nan
    return TensorDiff(kb, None if ka == kb else ka, side_b.specs[kb][0], side_a.specs[ka][1],
                      side_b.specs[kb][1], numel, not differs, "compared", max_abs, rel, cosine,
                      changed, changed / numel if numel else 0.0, nan_a, nan_b,
                      l2_a=math.sqrt(aa), l2_diff=math.sqrt(dd))


def _unreadable(t: Any) -> str:
    if isinstance(t, _Stored):
        return ""
    import torch

    if t.device.type == "meta":
        return "stored without data (a meta tensor)"
    if t.layout != torch.strided:
        return f"layout {t.layout} is not compared"
    return ""


def _comparable(ta: Any, tb: Any) -> tuple[tuple[Any, str], tuple[Any, str]]:
    """Both tensors' stored elements as numpy arrays, real-valued, with their dtype names."""
    (xa, da), (xb, db) = (_measure.from_torch(t) if not isinstance(t, _Stored) else t for t in (ta, tb))
    return _measure.comparable(xa, da, xb, db)


class _Pool:
    """Measures pieces on a few threads (numpy's kernels release the GIL), in order, with a
    bounded number in flight so copies made for strided tensors stay few."""

    def __init__(self, workers: int, *, fused: bool = False) -> None:
        self.workers = workers
        self.fused = fused
        self.executor: ThreadPoolExecutor | None = None
        self.scratch = _measure.Scratch()

    def __enter__(self) -> _Pool:
        if self.workers > 1:
            self.executor = ThreadPoolExecutor(self.workers, thread_name_prefix="weightsmith-diff")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)
        self.scratch = _measure.Scratch()  # let the buffers go

    def map(self, pieces: Iterator[tuple[np.ndarray, np.ndarray]],
            fn: Callable[[np.ndarray, np.ndarray], _Part]) -> Iterator[tuple[_Part, int]]:
        pending: deque[tuple[Future[_Part], int]] = deque()
        for pa, pb in pieces:
            nbytes = pa.nbytes + pb.nbytes
            if self.executor is None:
                yield fn(pa, pb), nbytes
                continue
            pending.append((self.executor.submit(fn, pa, pb), nbytes))
            if len(pending) >= 2 * self.workers:
                future, n = pending.popleft()
                yield future.result(), n
        while pending:
            future, n = pending.popleft()
            yield future.result(), n


def _measure_piece(pa: np.ndarray, pb: np.ndarray, da: str, db: str, work: Any, atol: float, rtol: float,
                   scratch: _measure.Scratch, fused: bool) -> _Part:
    """One pair of stored pieces, widened to ``work``, compared in blocks that stay in a
    core's own cache between the passes over them (in one compiled pass when ``fused`` and
    no widening is needed)."""
    if fused and pa.dtype == pb.dtype == work:
        return _measure.compare(pa, pb, atol, rtol, scratch, fused=True)
    if fused and da == db == "bfloat16" and work == np.float32:
        part = _measure.compare_bfloat16(pa, pb, atol, rtol, scratch)
        if part is not None:
            return part
    parts = []
    for i in range(0, pa.size, BLOCK_ELEMENTS):
        a = _measure.widen(pa[i:i + BLOCK_ELEMENTS], da, lambda n: scratch.get("a", n, work), work=work)
        b = _measure.widen(pb[i:i + BLOCK_ELEMENTS], db, lambda n: scratch.get("b", n, work), work=work)
        parts.append(_measure.compare(a, b, atol, rtol, scratch, fused=fused))
    return _measure.combine(parts) if len(parts) != 1 else parts[0]
