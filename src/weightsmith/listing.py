"""The parameter table of a checkpoint file, read from its header alone (no torch import)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._result import Result
from .io._base import TensorInfo

__all__ = ["Listing", "Row", "list_checkpoint", "fold_name", "block_name", "human_bytes", "elide"]

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)")


def fold_name(key: str) -> str:
    """Replace layer indices by ``#``: ``layers.3.mlp.weight`` -> ``layers.#.mlp.weight``."""
    return _INDEX.sub("#", key)


def block_name(key: str) -> str:
    """The block a key belongs to, indices kept: its path up to the first index
    (``encoder.layer.5.attention.self.query.weight`` -> ``encoder.layer.5``), else its module
    (``embeddings.LayerNorm.weight`` -> ``embeddings.LayerNorm``; ``bias`` -> ``bias``).

    >>> block_name("encoder.layer.5.output.dense.bias"), block_name("pooler.dense.weight")
    ('encoder.layer.5', 'pooler.dense')
    """
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:-1]) or key


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
    """A checkpoint's tensors with totals; the elements of tied tensors are counted once.

    A checkpoint does not say which tensors were parameters and which buffers (an ``int64``
    ``position_ids`` is stored like a weight), so counts are *elements*. ``by_dtype`` adds up to
    the totals: every name counts in ``tensors``, each storage once in ``elements``/``nbytes``.
    """

    SCHEMA = "weightsmith.inspect/1"
    path: str
    format: str
    root: str
    rows: list[Row]
    tensors: int
    elements: int
    nbytes: int
    by_dtype: dict[str, dict[str, int]]
    roots: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    other_objects: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    folded: bool = False
    layout: bool = False

    @property
    def parameters(self) -> int:
        """Former name of `elements` (a checkpoint cannot tell parameters from buffers)."""
        return self.elements

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready builtins; ``parameters`` repeats ``elements`` for readers of earlier output."""
        out = super().to_dict()
        out["parameters"] = self.elements
        for v in out["by_dtype"].values():
            v["parameters"] = v["elements"]
        return out

    def _columns(self) -> list[tuple[str, list[str], str]]:
        """(header, cells, justify) for each column worth showing: empty columns are dropped."""
        names = [row.key + (f"  ×{row.count}" if row.count > 1 else "") for row in self.rows]
        cols = [("name" if not self.folded else "name (# = any index)", names, "left"),
                ("shape", ["various" if r.shape is None else str(tuple(r.shape)) for r in self.rows], "left"),
                ("dtype", [r.dtype for r in self.rows], "left"),
                ("elements", [f"{r.numel:,}" for r in self.rows], "right"),
                ("size", [human_bytes(r.nbytes) for r in self.rows], "right")]
        if any(r.tied_with for r in self.rows):
            cols.append(("tied with", [", ".join(r.tied_with) for r in self.rows], "left"))
        if self.layout:
            cols.append(("stored in", [" ".join(r.stored_in) for r in self.rows], "left"))
        return cols

    def _footer(self) -> list[str]:
        lines = [f"{self.tensors:,} tensors, {self.elements:,} elements (tied counted once), "
                 f"{human_bytes(self.nbytes)}"]
        lines += [f"  {dt}: {v['tensors']:,} tensors, {v['elements']:,} elements, {human_bytes(v['nbytes'])}"
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
        return lines

    def plain(self) -> str:
        """Aligned rows without borders or wrapping, for pipes: every name whole on one line."""
        cols = self._columns()
        return "\n".join([f"{self.path} ({self.format})", plain_rows(cols), *self._footer()])

    def _rich_(self) -> Any:
        return FittedTable(f"{self.path} ({self.format})", self._columns(), "\n".join(self._footer()))


def plain_rows(cols: list[tuple[str, list[str], str]]) -> str:
    """``(header, cells, justify)`` columns as space-aligned text: no borders, nothing cut."""
    widths = [max(len(h), *(len(c) for c in cells)) if cells else len(h) for h, cells, _ in cols]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if j == "right" else c.ljust(w)
                         for c, w, (_, _, j) in zip(cells, widths, cols)).rstrip()

    rows = len(cols[0][1]) if cols else 0
    return "\n".join([line([h for h, _, _ in cols]), *(line([c[i] for _, c, _ in cols]) for i in range(rows))])


class FittedTable:
    """A rich table fitted to the console: the first column (names) shortened with `elide`
    to the room the other columns leave, so shapes, dtypes and sizes stay readable."""

    _FOLDING = ("tied with", "stored in")  # long lists that may wrap; never worth squeezing names for

    def __init__(self, title: str, cols: list[tuple[str, list[str], str]], footer: str = "") -> None:
        self.title, self.cols, self.footer = title, cols, footer

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.table import Table
        from rich.text import Text

        widths = [max(len(h), *(len(c) for c in cells)) if cells else len(h) for h, cells, _ in self.cols]
        others = sum(w for w, (h, _, _) in zip(widths[1:], self.cols[1:]) if h not in self._FOLDING)
        room = max(16, options.max_width - others - 3 * len(self.cols) - 1)
        table = Table(title=self.title, title_justify="left")
        for (header, _, justify), width in zip(self.cols, widths):
            wraps = header in self._FOLDING
            # the short columns keep their width; only the names give way
            table.add_column(header, justify=justify, no_wrap=not wraps,
                             overflow="fold" if wraps else "ellipsis",
                             min_width=None if wraps or header == self.cols[0][0] else width)
        for i in range(len(self.cols[0][1]) if self.cols else 0):
            cells = [cells[i] for _, cells, _ in self.cols]
            cells[0] = elide(cells[0], room)
            table.add_row(*cells)
        yield table
        if self.footer:
            yield Text(self.footer)


def elide(name: str, width: int) -> str:
    """Shorten ``name`` to ``width`` characters, keeping its layer indices and its last two
    segments: middle segments are cut to their first letter, longest first; if that is not
    enough, characters are cut from the middle.

    >>> elide("encoder.layer.11.attention.output.dense.weight", 32)
    'e.layer.11.a.output.dense.weight'
    """
    if len(name) <= width:
        return name
    parts = name.split(".")
    middle = sorted((i for i in range(len(parts) - 2) if not parts[i].isdigit() and len(parts[i]) > 1),
                    key=lambda i: (-len(parts[i]), i))
    for i in middle:
        parts[i] = parts[i][0]
        if len(".".join(parts)) <= width:
            return ".".join(parts)
    short = ".".join(parts)
    if len(short) <= width:
        return short
    head = (width - 1) * 2 // 5
    return short[:head] + "…" + short[len(short) - (width - 1 - head):]


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
    totals = {"tensors": 0, "elements": 0, "nbytes": 0}
    by_dtype: dict[str, dict[str, int]] = {}
    for key in keys:
        info = infos[key]
        others = tuple(k for k in tied.get(info.storage or "", ()) if k != key)
        rows.append(Row(key, info.shape, info.dtype, info.numel, info.nbytes, others,
                        stored_in=_stored_in(ckpt, key, info) if layout else ()))
        totals["tensors"] += 1
        d = by_dtype.setdefault(info.dtype, {"tensors": 0, "elements": 0, "nbytes": 0})
        d["tensors"] += 1  # every name, so the per-dtype counts add up to the total
        if info.storage is not None and info.storage in seen:
            continue  # a tie: its elements and bytes are already counted
        if info.storage is not None:
            seen.add(info.storage)
        d["elements"] += info.numel
        d["nbytes"] += info.nbytes
        totals["elements"] += info.numel
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
        elements=totals["elements"], nbytes=totals["nbytes"], by_dtype=by_dtype,
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
