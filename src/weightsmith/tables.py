"""Parameter tables: what a model or checkpoint holds, where, and how much of it trains.

`summary` reads names, shapes, dtypes and devices only: it runs no forward pass and reads no
tensor data, so it works on meta-device models and on checkpoints opened lazily.
"""

from __future__ import annotations

import os

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import UsageError
from ._result import Rendered, Result
from ._tensors import dtype_name, is_dtensor

__all__ = ["Summary", "Entry", "ModuleEntry", "Totals", "Rollup", "summary"]

ROOT = "(root)"  # how the model itself is named where a name is needed


@dataclass
class Entry:
    """One parameter, buffer or checkpoint tensor.

    Attributes:
        name: dotted name, e.g. ``"0.weight"``.
        shape: the (global) shape.
        dtype: torch dtype name, e.g. ``"float32"``.
        device: ``"cpu"``, ``"cuda:0"``, ``"meta"``; ``None`` for a tensor still in a file.
        count: number of elements.
        nbytes: bytes of storage the elements take.
        trainable: ``requires_grad`` of a parameter; ``None`` where it does not apply
            (buffers, plain tensors, checkpoint entries).
        kind: ``"parameter"``, ``"buffer"``, or ``"tensor"`` where a state dict or a checkpoint
            cannot tell the two apart.
        persistent: ``False`` for a buffer left out of ``state_dict()``.
        tied_with: the other names of the same Parameter or the same storage.
        local_shape: the shape of this rank's shard for a ``DTensor``, else ``None``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    device: str | None
    count: int
    nbytes: int
    trainable: bool | None
    kind: str
    persistent: bool = True
    tied_with: tuple[str, ...] = ()
    local_shape: tuple[int, ...] | None = None


@dataclass
class ModuleEntry:
    """One submodule and the parameters and buffers it holds itself (not its children's).

    Attributes:
        name: dotted module name, ``""`` for the model itself.
        type: class name, e.g. ``"Linear"``.
        parameters: full names of its own parameters; empty for layers such as ``ReLU``.
        buffers: full names of its own buffers.
        same_as: other names under which the same module object appears (a reused layer).
    """

    name: str
    type: str
    parameters: tuple[str, ...]
    buffers: tuple[str, ...] = ()
    same_as: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line such as ``"1 (ReLU): no parameters"``."""
        held = ", ".join(self.parameters) or "no parameters"
        if self.buffers:
            held += "; buffers: " + ", ".join(self.buffers)
        return f"{self.name or ROOT} ({self.type}): {held}"


@dataclass
class Totals:
    """Element counts of parameters (trainable + frozen), buffers, and the bytes of both."""

    all: int = 0
    trainable: int = 0
    frozen: int = 0
    buffers: int = 0
    nbytes: int = 0


@dataclass
class Rollup:
    """Totals for one module down to the requested depth: its whole subtree, children included
    (tied storage counted once within it); ``own`` is what the module holds itself
    (parameters and buffers), so a parent's ``count`` is its children's plus its own."""

    name: str
    type: str | None
    count: int
    trainable: int
    frozen: int
    buffers: int
    own: int = 0


@dataclass
class Summary(Result):
    """The parameter table of a model, state dict or checkpoint.

    Attributes:
        source: what was summarized (a class name or a checkpoint path).
        rows: one `Entry` per name, tied names included (marked in ``tied_with``).
        totals: counts with each storage counted once.
        referenced: counts with every name counted, so a tied weight counts once per name.
        modules: every submodule with its own parameters (models only; empty otherwise).
        rollup: totals per module at ``depth`` (``None`` unless asked for).
        depth: the depth of ``rollup``.
    """

    SCHEMA: ClassVar[str] = "weightsmith.summary/1"

    source: str
    rows: list[Entry]
    totals: Totals
    referenced: Totals
    modules: list[ModuleEntry] = field(default_factory=list)
    rollup: list[Rollup] | None = None
    depth: int | None = None

    def __getitem__(self, name: str) -> Entry:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def names(self, *, kind: str | None = None, duplicates: bool = True) -> list[str]:
        """Row names, optionally of one ``kind``; ``duplicates=False`` keeps one name per tie."""
        seen: set[str] = set()
        out = []
        for row in self.rows:
            if kind is not None and row.kind != kind:
                continue
            if not duplicates and seen.intersection(row.tied_with):
                continue
            seen.add(row.name)
            out.append(row.name)
        return out

    @property
    def tied_groups(self) -> list[tuple[str, ...]]:
        """Each group of names that share one tensor, in table order."""
        groups: list[tuple[str, ...]] = []
        seen: set[str] = set()
        for row in self.rows:
            if row.tied_with and row.name not in seen:
                group = (row.name, *row.tied_with)
                seen.update(group)
                groups.append(group)
        return groups

    def module(self, name: str) -> ModuleEntry:
        """The `ModuleEntry` called ``name`` (``""`` for the model itself)."""
        for entry in self.modules:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def totals_line(self) -> str:
        """E.g. ``"parameters: 49 (trainable 49, frozen 0); buffers: 0"``, plus tied counts."""
        t, r = self.totals, self.referenced
        unknown = t.all - t.trainable - t.frozen
        if unknown == t.all and t.all:  # a state dict or checkpoint: no requires_grad, no kinds
            line = f"elements: {t.all:,} in {len(self.names(duplicates=False)):,} tensors"
        else:
            line = f"parameters: {t.all:,} (trainable {t.trainable:,}, frozen {t.frozen:,}"
            line += f", unknown {unknown:,})" if unknown else ")"
        if t.buffers or r.buffers:
            line += f"; buffers: {t.buffers:,}"
        line += f"; {_size(t.nbytes)}"
        if r.all != t.all or r.buffers != t.buffers:
            groups = len(self.tied_groups)
            line += f"; as referenced: {r.all:,}"
            line += f" + {r.buffers:,} in buffers" if r.buffers else ""
            line += f" ({groups} tied group{'s' if groups != 1 else ''} counted once above)"
        return line

    def modules_table(self) -> Rendered:
        """Every module and the parameters it holds itself ("no parameters"): a table that
        prints with rich, and shows as text in a REPL (HTML in Jupyter)."""
        from rich.table import Table

        table = Table(title=f"modules of {self.source}")
        for col in ("module", "type", "holds"):
            table.add_column(col)
        for entry in self.modules:
            held = ", ".join(entry.parameters) or "no parameters"
            if entry.buffers:
                held += "; buffers: " + ", ".join(entry.buffers)
            if entry.same_as:
                held += f" (same module as {', '.join(entry.same_as)})"
            table.add_row(entry.name or ROOT, entry.type, held)
        return Rendered(table)

    def to_markdown(self) -> str:
        """The table, totals and rollup as GitHub-flavoured Markdown."""
        lines = ["| " + " | ".join(_HEADERS) + " |", "|" + "---|" * len(_HEADERS)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(row)) + " |"
                  for row in self.rows]
        lines += ["", self.totals_line()]
        if self.rollup is not None:
            lines += ["", "| module | type | parameters | own | trainable | frozen | buffers |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {r.name or ROOT} | {r.type or ''} | {_count_or_none(r)} | {r.own:,} "
                      f"| {r.trainable:,} | {r.frozen:,} | {r.buffers:,} |" for r in self.rollup]
        return "\n".join(lines) + "\n"

    def _columns(self) -> list[tuple[str, list[str], str]]:
        """(header, cells, justify) per column, narrowed to fit 80 columns: a column saying the
        same for every row moves to `_notes` (one device; nothing frozen; nothing tied), and a
        non-persistent buffer is marked ``buffer*``. `to_markdown` keeps every column."""
        rows = self.rows
        cols = [("name", [r.name for r in rows], "left"),
                ("shape", [_cells(r)[1] for r in rows], "left"),
                ("dtype", [r.dtype for r in rows], "left")]
        if len({r.device for r in rows}) > 1:
            cols.append(("device", [r.device or "-" for r in rows], "left"))
        cols.append(("count", [f"{r.count:,}" for r in rows], "right"))
        if any(r.trainable is False for r in rows):
            cols.append(("trainable", [_cells(r)[5] for r in rows], "left"))
        cols.append(("kind", [("param" if r.kind == "parameter" else r.kind) + ("" if r.persistent else "*")
                              for r in rows], "left"))
        if any(r.tied_with for r in rows):
            cols.append(("tied with", [", ".join(r.tied_with) for r in rows], "left"))
        return cols

    def _notes(self) -> list[str]:
        devices = {r.device for r in self.rows}
        notes = [self.totals_line()]
        if len(devices) == 1 and self.rows:
            notes.append(f"device: {next(iter(devices)) or '- (in a file)'}")
        if any(not r.persistent for r in self.rows):
            notes.append("buffer*: non-persistent (not in state_dict())")
        return notes

    def plain(self) -> str:
        """Aligned rows without borders or wrapping, for pipes: every name whole on one line."""
        from .listing import plain_rows

        text = [f"parameters of {self.source}", plain_rows(self._columns()), *self._notes()]
        if self.rollup is not None:
            text += ["", str(self._rollup_table())]
        return "\n".join(text)

    def _rich_(self) -> Any:
        from rich.console import Group

        from .listing import FittedTable

        table = FittedTable(f"parameters of {self.source}", self._columns(), "\n".join(self._notes()))
        if self.rollup is None:
            return table
        return Group(table, self._rollup_table())

    def _rollup_table(self) -> Any:
        from rich.table import Table

        roll = Table(title=f"per module, depth {self.depth} (parameters: with children; own: held itself)")
        for col in ("module", "type", "parameters", "own", "trainable", "frozen", "buffers"):
            roll.add_column(col, justify="left" if col in ("module", "type") else "right",
                            no_wrap=col == "module")
        for r in self.rollup:
            level = r.name.count(".") + 1 if r.name else 0
            roll.add_row("  " * max(level - 1, 0) + (r.name or ROOT), r.type or "", _count_or_none(r),
                         f"{r.own:,}", f"{r.trainable:,}", f"{r.frozen:,}", f"{r.buffers:,}")
        return Rendered(roll)


_HEADERS = ("name", "shape", "dtype", "device", "count", "trainable", "kind", "tied with")


def _cells(row: Entry) -> list[str]:
    shape = str(row.shape)
    if row.local_shape is not None:
        shape += f" local {row.local_shape}"
    trainable = "-" if row.trainable is None else ("yes" if row.trainable else "no")
    kind = row.kind if row.persistent else f"{row.kind} (non-persistent)"
    return [row.name, shape, row.dtype, row.device or "-", f"{row.count:,}", trainable, kind,
            ", ".join(row.tied_with)]


def _count_or_none(r: Rollup) -> str:
    return f"{r.count:,}" if r.count or r.buffers else "no parameters"


def _size(nbytes: int) -> str:
    from .listing import human_bytes  # binary units (KiB, MiB), as everywhere in weightsmith

    return human_bytes(nbytes)


# ---------------------------------------------------------------- reading targets


def is_checkpoint(target: Any) -> bool:
    """Whether ``target`` looks like an opened checkpoint: tensor infos by key, and ``.tensor``."""
    return (callable(getattr(target, "tensor", None)) and hasattr(target, "keys")
            and not isinstance(target, (torch.Tensor, nn.Module)))


def _is_info(value: Any) -> bool:
    return (not isinstance(value, torch.Tensor) and isinstance(getattr(value, "dtype", None), str)
            and hasattr(value, "shape"))



def storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    """A key equal for two tensors that are the same view of the same memory.

    Meta, empty and lazy tensors have no memory to compare, so only the object itself counts.
    """
    if is_dtensor(t):
        t = t.to_local()  # type: ignore[attr-defined]
    if t.device.type == "meta" or nn.parameter.is_lazy(t) or t.numel() == 0:
        return ("object", id(t))
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse, quantized, other subclasses
        return ("object", id(t))
    return (str(t.device), ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def module_tensors(model: nn.Module
                    ) -> Iterator[tuple[str, str, nn.Module, str, torch.Tensor, bool]]:
    """Every ``(full name, module name, module, own name, tensor, is_parameter)``: parameters
    then buffers of each module, reused modules and tied parameters under each of their names."""
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for short, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            yield prefix + short, mod_name, mod, short, p, True
        for short, b in mod.named_buffers(recurse=False, remove_duplicate=False):
            yield prefix + short, mod_name, mod, short, b, False


# ---------------------------------------------------------------- the public function


def summary(target: nn.Module | Mapping[str, Any] | str | os.PathLike[str], *, depth: int | None = None) -> Summary:
    """The parameter table of a model, a state dict or an opened checkpoint.

    Tied parameters (one Parameter under two names, or two names viewing the same memory)
    are listed under every name, marked in ``tied_with``, and counted once in ``totals``;
    ``referenced`` counts them per name. Nothing is computed on tensor data.

    Args:
        target: an ``nn.Module``, a mapping of names to tensors, or a checkpoint from
            `weightsmith.open` (read from its header, no tensor is loaded).
        depth: also total the counts per module at this depth (1: per top-level child).

    Returns:
        A `Summary`; ``str()`` of it is the table, ``to_markdown()``/``to_json()`` too.

    Raises:
        TypeError: ``target`` is none of the above, or a mapping holds non-tensor values.
        ValueError: ``depth`` is negative.

    >>> from torch import nn
    >>> s = summary(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))
    >>> s.totals.all, s["2.bias"].shape, s.module("1").describe()
    (49, (1,), '1 (ReLU): no parameters')
    """
    if depth is not None and (not isinstance(depth, int) or depth < 0):
        raise UsageError(f"depth must be a non-negative integer, got {depth!r}")
    if isinstance(target, (str, os.PathLike)):
        from .checkpoint import open as open_checkpoint

        target = open_checkpoint(target)
    if isinstance(target, nn.Module):
        rows, keys, modules = _from_module(target)
        source = type(target).__name__
    elif is_checkpoint(target) or (isinstance(target, Mapping) and _all_infos(target)):
        rows, keys = _from_infos(target)
        modules = []
        source = str(getattr(target, "path", None) or type(target).__name__)
    elif isinstance(target, Mapping):
        rows, keys = _from_tensors(target)
        modules = []
        source = "state dict" if isinstance(target, dict) else type(target).__name__
    else:
        raise UsageError(f"summary() takes an nn.Module, a mapping of tensors or a checkpoint, "
                        f"not {type(target).__name__}")
    _mark_ties(rows, keys)
    totals = _totals(rows, keys, unique=True)
    referenced = _totals(rows, keys, unique=False)
    rollup = None if depth is None else _rollup(rows, keys, modules, depth,
                                                target if isinstance(target, nn.Module) else None)
    return Summary(source, rows, totals, referenced, modules, rollup, depth)


def _all_infos(mapping: Mapping[str, Any]) -> bool:
    values = list(mapping.values())
    return bool(values) and all(_is_info(v) for v in values)


def _from_module(model: nn.Module) -> tuple[list[Entry], list[Any], list[ModuleEntry]]:
    rows: list[Entry] = []
    keys: list[Any] = []
    own: dict[str, tuple[list[str], list[str]]] = {}
    mods: dict[str, nn.Module] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        own[mod_name] = ([], [])
        mods[mod_name] = mod
    for full, mod_name, mod, short, t, is_param in module_tensors(model):
        persistent = is_param or short not in mod._non_persistent_buffers_set
        rows.append(_entry(full, t, kind="parameter" if is_param else "buffer",
                           trainable=bool(t.requires_grad) if is_param else None,
                           persistent=persistent))
        keys.append(storage_key(t))
        own[mod_name][0 if is_param else 1].append(full)
    by_id: dict[int, list[str]] = {}
    for name, mod in mods.items():
        by_id.setdefault(id(mod), []).append(name)
    modules = [
        ModuleEntry(name, type(mod).__name__, tuple(own[name][0]), tuple(own[name][1]),
                    tuple(n for n in by_id[id(mod)] if n != name))
        for name, mod in mods.items()
    ]
    return rows, keys, modules


def _entry(name: str, t: torch.Tensor, *, kind: str, trainable: bool | None,
           persistent: bool = True) -> Entry:
    if nn.parameter.is_lazy(t):  # shape unknown until the first forward pass
        return Entry(name, (), dtype_name(t.dtype), str(t.device), 0, 0, trainable, kind,
                     persistent)
    local = t.to_local() if is_dtensor(t) else None  # type: ignore[attr-defined]
    local_shape = None if local is None else tuple(local.shape)
    count = t.numel()  # from the shape: safe on meta tensors, global for a DTensor
    return Entry(name, tuple(t.shape), dtype_name(t.dtype), str(t.device), count,
                 count * t.element_size(), trainable, kind, persistent, (), local_shape)


def _from_tensors(mapping: Mapping[str, Any]) -> tuple[list[Entry], list[Any]]:
    bad = [f"{k!r} is {type(v).__name__}" for k, v in mapping.items()
           if not isinstance(v, torch.Tensor)]
    if bad:
        raise UsageError("summary() needs every value of a mapping to be a tensor; "
                        + "; ".join(bad[:10])
                        + (f" (and {len(bad) - 10} more)" if len(bad) > 10 else "")
                        + ". For a nested checkpoint pass its tensor dict, e.g. ckpt['state_dict']")
    rows, keys = [], []
    for name, t in mapping.items():
        is_param = isinstance(t, nn.Parameter)
        rows.append(_entry(str(name), t, kind="parameter" if is_param else "tensor",
                           trainable=bool(t.requires_grad) if is_param else None))
        keys.append(storage_key(t))
    return rows, keys


def _from_infos(ckpt: Any) -> tuple[list[Entry], list[Any]]:
    rows, keys = [], []
    for name in ckpt.keys():
        info = ckpt[name]
        shape = tuple(int(d) for d in info.shape)
        count = int(getattr(info, "numel", None) or _prod(shape))
        rows.append(Entry(str(name), shape, str(info.dtype), getattr(info, "device", None), count,
                          int(getattr(info, "nbytes", 0)), None, "tensor"))
        storage = getattr(info, "storage", None)
        keys.append(("object", name) if storage is None else ("storage", storage))
    return rows, keys


def _prod(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _mark_ties(rows: list[Entry], keys: list[Any]) -> None:
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        if len(members) > 1:
            names = [rows[i].name for i in members]
            for i in members:
                rows[i].tied_with = tuple(n for n in names if n != rows[i].name)


def _totals(rows: list[Entry], keys: list[Any], *, unique: bool,
            only: Iterable[int] | None = None) -> Totals:
    out = Totals()
    seen: set[Any] = set()
    for i in (range(len(rows)) if only is None else only):
        row, key = rows[i], keys[i]
        if unique:
            if key in seen:
                continue
            seen.add(key)
        out.nbytes += row.nbytes
        if row.kind == "buffer":
            out.buffers += row.count
            continue
        out.all += row.count
        if row.trainable is True:
            out.trainable += row.count
        elif row.trainable is False:
            out.frozen += row.count
    return out


def _rollup(rows: list[Entry], keys: list[Any], modules: list[ModuleEntry], depth: int,
            model: nn.Module | None) -> list[Rollup]:
    """Every module down to ``depth`` with its whole subtree's totals (torchinfo's convention:
    a parent counts its children), and ``own`` what it holds itself."""
    owner = {name: m.name for m in modules for name in (*m.parameters, *m.buffers)}
    names: dict[str, None] = {"": None}
    for m in modules:  # every module, so layers without parameters show up too
        if m.name and m.name.count(".") < depth:
            names[m.name] = None
    under: dict[str, list[int]] = {}
    own: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        mod_name = owner.get(row.name, row.name.rpartition(".")[0])
        own.setdefault(mod_name, []).append(i)
        parts = mod_name.split(".") if mod_name else []
        for level in range(min(len(parts), depth) + 1):
            prefix = ".".join(parts[:level])
            names.setdefault(prefix, None)  # a checkpoint: modules known from the key names only
            under.setdefault(prefix, []).append(i)
    types = {m.name: m.type for m in modules}
    out = []
    for name in names:
        mine = own.get(name, [])
        if not name and depth and not mine:  # the model itself only where it holds something
            continue
        t = _totals(rows, keys, unique=True, only=under.get(name, []))
        o = _totals(rows, keys, unique=True, only=mine)
        out.append(Rollup(name, types.get(name) if model is not None else None, t.all,
                          t.trainable, t.frozen, t.buffers, own=o.all + o.buffers))
    return out


