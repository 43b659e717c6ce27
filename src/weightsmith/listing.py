"""The parameter table of a checkpoint file, read from its header alone (no torch import)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._result import Result
from .io._base import TensorInfo

__all__ = ["Listing", "Row", "list_checkpoint", "fold_name", "human_bytes"]

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)")


def fold_name(key: str) -> str:
    """Replace layer indices by ``#``: ``layers.3.mlp.weight`` -> ``layers.#.mlp.weight``."""
    return _INDEX.sub("#", key)


def human_bytes(n: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


@dataclass
class Row:
    """One line of the table: a tensor, or with folding a family of tensors (``count`` > 1)."""

    key: str
    shape: tuple[int, ...] | None
    dtype: str
    numel: int
    nbytes: int
    tied_with: tuple[str, ...] = ()
    count: int = 1
    stored_in: tuple[str, ...] = ()  # with ``layout``: the file (and region) of each stored piece

    def to_dict(self) -> dict[str, Any]:
        out = {"key": self.key, "shape": None if self.shape is None else list(self.shape),
               "dtype": self.dtype, "numel": self.numel, "nbytes": self.nbytes,
               "tied_with": list(self.tied_with), "count": self.count}
        if self.stored_in:
            out["stored_in"] = list(self.stored_in)
        return out


@dataclass
class Listing(Result):
    """A checkpoint's tensors with totals; parameters of tied tensors are counted once."""

    SCHEMA = "weightsmith.inspect/1"
    path: str
    format: str
    root: str
    rows: list[Row]
    tensors: int
    parameters: int
    nbytes: int
    by_dtype: dict[str, dict[str, int]]
    roots: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    other_objects: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    folded: bool = False
    layout: bool = False

    def _rich_(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title=f"{self.path} ({self.format})", title_justify="left")
        table.add_column("name" if not self.folded else "name (# = any index)", no_wrap=True)
        table.add_column("shape")
        table.add_column("dtype")
        table.add_column("parameters", justify="right")
        table.add_column("size", justify="right")
        table.add_column("tied with", overflow="fold")
        if self.layout:
            table.add_column("stored in", overflow="fold")
        for row in self.rows:
            name = row.key + (f"  ×{row.count}" if row.count > 1 else "")
            shape = "various" if row.shape is None else str(tuple(row.shape))
            cells = [name, shape, row.dtype, f"{row.numel:,}", human_bytes(row.nbytes), ", ".join(row.tied_with)]
            table.add_row(*cells, *(["\n".join(row.stored_in)] if self.layout else []))
        lines = [f"{self.tensors} tensors, {self.parameters:,} parameters (tied counted once), "
                 f"{human_bytes(self.nbytes)}"]
        lines += [f"  {dt}: {v['tensors']} tensors, {v['parameters']:,} parameters, {human_bytes(v['nbytes'])}"
                  for dt, v in self.by_dtype.items()]
        if self.root or len(self.roots) > 1:
            alts = ", ".join(repr(r) if r else "(top)" for r in self.roots if r != self.root)
            lines.append(f"root: {self.root!r}" if self.root else "root: (top)")
            lines[-1] += f"; other roots: {alts}" if alts else ""
        if self.other_objects:
            shown = list(self.other_objects.items())[:8]
            lines.append("other objects (not constructed): " + ", ".join(f"{k}: {v}" for k, v in shown)
                         + (" ..." if len(self.other_objects) > 8 else ""))
        lines += [f"note: {n}" for n in self.notes]
        return Group(table, Text("\n".join(lines)))


def list_checkpoint(ckpt: Any, *, select: Any = None, sort: str | None = None, fold: bool = False,
                    layout: bool = False) -> Listing:
    """The table of a `Checkpoint` (or any mapping of key -> `TensorInfo`).

    Args:
        ckpt: an open checkpoint.
        select: a selector (glob, ``re:``) keeping only matching keys.
        sort: ``"name"``, ``"size"`` (largest first) or ``None`` (file order).
        fold: fold layer indices, one row per family (``layers.#.mlp.weight  ×24``).
        layout: say where each tensor is stored: its shard file in a sharded folder, each chunk's
            file and region of the global tensor in a DCP folder (``__1_0.distcp [4:8, 0:16]``).
    """
    from .selectors import select as pick

    infos: Mapping[str, TensorInfo] = ckpt
    keys = list(infos) if select is None else pick(infos, select)
    tied: dict[str, list[str]] = {}
    for key in infos:
        sid = infos[key].storage
        if sid is not None:
            tied.setdefault(sid, []).append(key)
    rows: list[Row] = []
    seen: set[str] = set()
    totals = {"tensors": 0, "parameters": 0, "nbytes": 0}
    by_dtype: dict[str, dict[str, int]] = {}
    for key in keys:
        info = infos[key]
        others = tuple(k for k in tied.get(info.storage or "", ()) if k != key)
        rows.append(Row(key, info.shape, info.dtype, info.numel, info.nbytes, others,
                        stored_in=_stored_in(ckpt, key, info) if layout else ()))
        totals["tensors"] += 1
        if info.storage is not None and info.storage in seen:
            continue
        if info.storage is not None:
            seen.add(info.storage)
        d = by_dtype.setdefault(info.dtype, {"tensors": 0, "parameters": 0, "nbytes": 0})
        d["tensors"] += 1
        d["parameters"] += info.numel
        d["nbytes"] += info.nbytes
        totals["parameters"] += info.numel
        totals["nbytes"] += info.nbytes
    if fold:
        rows = _fold(rows)
    if sort == "name":
        rows.sort(key=lambda r: r.key)
    elif sort == "size":
        rows.sort(key=lambda r: (-r.nbytes, r.key))
    reader = getattr(ckpt, "reader", None)
    return Listing(
        path=str(getattr(ckpt, "path", "")), format=getattr(ckpt, "format", "?"),
        root=getattr(ckpt, "root", ""), rows=rows, tensors=totals["tensors"],
        parameters=totals["parameters"], nbytes=totals["nbytes"], by_dtype=by_dtype,
        roots=tuple(getattr(ckpt, "roots", ())), metadata=dict(getattr(ckpt, "metadata", {})),
        other_objects=dict(getattr(ckpt, "other_objects", {})),
        notes=list(reader.notes) if reader is not None else [], folded=fold, layout=layout and not fold,
    )


def _stored_in(ckpt: Any, key: str, info: TensorInfo) -> tuple[str, ...]:
    """Where ``key``'s data lies: chunks of a DCP folder with their regions, else its file."""
    chunks = getattr(getattr(ckpt, "reader", None), "layout", {}).get(key)
    if chunks:
        return tuple(f"{c.file} [{', '.join(f'{o}:{o + n}' for o, n in zip(c.offsets, c.sizes))}]"
                     for c in chunks if c.numel)
    return (info.file,) if info.file else ()


def _fold(rows: list[Row]) -> list[Row]:
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(fold_name(row.key), []).append(row)
    out = []
    for name, members in groups.items():
        shapes = {m.shape for m in members}
        dtypes = {m.dtype for m in members}
        out.append(Row(name, members[0].shape if len(shapes) == 1 else None,
                       members[0].dtype if len(dtypes) == 1 else "mixed",
                       sum(m.numel for m in members), sum(m.nbytes for m in members),
                       tuple(sorted({fold_name(t) for m in members for t in m.tied_with})), len(members)))
    return out
