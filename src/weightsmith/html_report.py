"""`report`: one self-contained HTML page describing a checkpoint, for people to read.

The checkpoint is streamed tensor by tensor: each tensor is read once (a numpy view of the
mapped file where the format allows, so a report on a file never imports torch), measured by
`stats`, judged by `check`, histogrammed in chunks when it is one of those shown, and compared
with the reference checkpoint when one is given. Only small results are kept, so a report on a model larger than memory is fine.

The page embeds plotly.js once and loads nothing else: it opens offline, and its content
security policy forbids any network request. The data behind the plots is embedded too, as JSON
in ``<script id="ws-data" type="application/json">`` (schema `SCHEMA`).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from . import _measure as kernel
from ._report_assets import CSP, DRILL_SCRIPT, ERROR_COLLECTOR, FONT, MONO, SORT_SCRIPT, STYLE
from ._result import to_plain
from .errors import UsageError, WeightsmithError
from .health import Finding, HealthReport, check
from .listing import Listing, block_name, fold_name, human_bytes, list_checkpoint
from .selectors import Selector, select as select_names
from .tensor_stats import CHUNK_BYTES, StatsReport, TensorStats, stats

__all__ = ["report", "BINS", "MAX_HISTOGRAMS", "SCHEMA"]

BINS = 60
MAX_HISTOGRAMS = 48  # 48 small plots open in a second; the table lists every tensor anyway
SCHEMA = "weightsmith.report/1"  # of the JSON embedded in the page

HIST_CHUNK = 2**22  # elements per histogram call: extra memory stays bounded on huge tensors
DIFF_CHUNK = 2**20  # elements per float64 difference
_SEVERE = ("nan", "inf", "exploding")  # drawn in red; all_zero and constant in amber
_FLOATING = ("float", "bfloat", "complex")  # dtype names of the tensors the heatmap shows

Progress = Callable[[int, int, str], None]


def report(
    src: Any,
    out: str | os.PathLike[str],
    *,
    compare: Any = None,
    select: Selector | None = None,
    bins: int = BINS,
    max_histograms: int = MAX_HISTOGRAMS,
    progress: Progress | None = None,
) -> Path:
    """Write one self-contained HTML page about a checkpoint.

    The page holds a header (file, format, tensor and parameter counts, size, health verdict),
    the findings of `check` (NaN, Inf, all-zero, constant, exploding), a layer × statistic
    heatmap, per-tensor histograms, and the parameter table with mean, std, absmax and zeros.
    With ``compare``, it also plots the relative L2 change of each tensor and layer,
    ``‖src − compare‖ / ‖compare‖``: what fine-tuning moved.

    Histograms are drawn for the ``max_histograms`` largest tensors and for up to as many
    tensors with findings; the page says which. Every tensor is in the table and the heatmap.

    Args:
        src: a checkpoint path (any format `weightsmith.open` reads) or an opened `Checkpoint`.
        out: the HTML file to write; an existing file is replaced.
        compare: a reference checkpoint (path or opened), e.g. the model before fine-tuning.
        select: only these names (see `weightsmith.selectors`), in both checkpoints.
        bins: bars per histogram.
        max_histograms: how many of the largest tensors get a histogram (0: none).
        progress: called as ``progress(done_bytes, total_bytes, key)`` while reading.

    Returns:
        The path written.

    Raises:
        UsageError: bad arguments, all listed at once; nothing is read or written.
        WeightsmithError: plotly is not installed (``pip install weightsmith[report]``).
        CheckpointError, SelectorError: from opening the checkpoints or applying ``select``.

    >>> import weightsmith                                                 # doctest: +SKIP
    >>> weightsmith.report("finetuned.safetensors", "report.html",          # doctest: +SKIP
    ...                    compare="base.safetensors")
    PosixPath('report.html')
    """
    path = _check_args(src, out, compare, bins, max_histograms, progress)
    plotly = _plotly()
    with _opened(src) as ckpt, _opened(compare) as reference:
        page = _measure(ckpt, reference, select=select, bins=bins, max_histograms=max_histograms,
                        progress=progress)
    text = _render(page, plotly)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # never a half-written report at `out`
    return path


def _check_args(src: Any, out: Any, compare: Any, bins: Any, max_histograms: Any,
                progress: Any) -> Path:
    problems = []
    for name, value in (("src", src), ("compare", compare)):
        if value is None and name == "compare":
            continue
        if not (isinstance(value, (str, os.PathLike)) or _is_checkpoint(value)):
            problems.append(f"{name} must be a checkpoint path or an opened checkpoint, "
                            f"got {type(value).__name__}")
    path = None
    if not isinstance(out, (str, os.PathLike)):
        problems.append(f"out must be a file path, got {type(out).__name__}")
    else:
        path = Path(out)
        if path.is_dir():
            problems.append(f"out {str(path)!r} is a folder; give the HTML file to write")
        elif not path.parent.is_dir():
            problems.append(f"out {str(path)!r}: the folder {str(path.parent)!r} does not exist")
    if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= 10_000:
        problems.append(f"bins must be an integer from 2 to 10000, got {bins!r}")
    if (isinstance(max_histograms, bool) or not isinstance(max_histograms, int)
            or max_histograms < 0):
        problems.append(f"max_histograms must be a non-negative integer, got {max_histograms!r}")
    if progress is not None and not callable(progress):
        problems.append(f"progress must be callable, got {type(progress).__name__}")
    if problems or path is None:
        raise UsageError("report(): " + "; ".join(problems))
    return path


def _plotly() -> SimpleNamespace:
    try:
        import plotly.graph_objects as go
        import plotly.io as pio
    except ImportError as e:
        raise WeightsmithError("report() draws its plots with plotly, which is not installed; "
                               "install it with: pip install weightsmith[report]") from e
    return SimpleNamespace(go=go, io=pio)


def _is_checkpoint(target: Any) -> bool:
    """Whether ``target`` looks like an opened checkpoint: tensor infos by key, and ``.tensor``."""
    return callable(getattr(target, "tensor", None)) and hasattr(target, "keys") and hasattr(target, "path")


@contextmanager
def _opened(target: Any) -> Iterator[Any]:
    """An opened checkpoint for a path (closed afterwards), or the given one as is."""
    if target is None or _is_checkpoint(target):
        yield target
        return
    from .checkpoint import open as open_checkpoint

    ckpt = open_checkpoint(target)
    try:
        yield ckpt
    finally:
        ckpt.close()


# ---------------------------------------------------------------- measuring


@dataclass
class _Histogram:
    """Counts of the finite values in ``bins`` equal bins from ``lo`` to ``hi``."""

    lo: float
    hi: float
    counts: list[int]


@dataclass
class _Change:
    """How far one tensor is from the reference: ``rel_l2 = diff_l2 / ref_l2``."""

    key: str
    rel_l2: float
    max_abs: float
    diff_l2: float
    ref_l2: float


@dataclass
class _Comparison:
    path: str
    changes: list[_Change]
    only_here: list[str]
    only_there: list[str]
    not_compared: dict[str, str]  # key -> why (shapes differ, no data)


@dataclass
class _Page:
    """Everything the page shows; the rendering reads nothing else."""

    listing: Listing
    stats: StatsReport
    health: HealthReport
    histograms: dict[str, _Histogram]
    largest: set[str]  # the tensors given a histogram for their size
    max_histograms: int
    comparison: _Comparison | None = None
    order: list[str] = field(default_factory=list)  # measured keys in natural layer order


def _measure(ckpt: Any, reference: Any, *, select: Selector | None, bins: int,
             max_histograms: int, progress: Progress | None) -> _Page:
    listing = list_checkpoint(ckpt, select=select)
    keys = [row.key for row in listing.rows]
    aliases = _aliases(ckpt, keys)
    unique = [k for k in keys if k not in aliases]
    largest = set(sorted(unique, key=lambda k: (-ckpt[k].numel, _natural(k)))[:max_histograms])
    comparison = common = None
    if reference is not None:
        comparison, common = _pair(ckpt, reference, keys, select)
    total = (sum(ckpt[k].nbytes for k in unique)
             + sum(reference[k].nbytes for k in common or ()))
    done = 0

    def report_progress(n: int, key: str) -> None:
        if progress is not None:
            progress(done + n, total, key)

    measured = StatsReport(str(ckpt.path), [], aliases=dict(aliases))
    histograms: dict[str, _Histogram] = {}
    flagged = 0  # histograms given for a finding rather than for size
    here, there = _Values(ckpt), _Values(reference)
    for key in keys:
        t = here.get(key)
        if key not in aliases:
            one = stats(_OneKey(ckpt, key), workers=None if ckpt[key].nbytes > 2 * CHUNK_BYTES else 1,
                        progress=lambda n, _total, k: report_progress(n, k))
            done += ckpt[key].nbytes
            report_progress(0, key)
            measured.skipped.update(one.skipped)
            measured.nbytes += one.nbytes
            if one.tensors:
                s = one.tensors[0]
                measured.tensors.append(s)
                found = not check(one).ok
                if key in largest or (found and flagged < max_histograms):
                    flagged += key not in largest
                    histogram = _histogram(t, s, bins)
                    if histogram is not None:
                        histograms[key] = histogram
        if comparison is not None and key in common:
            change = _change(key, t, there.get(key), comparison)
            if change is not None:
                comparison.changes.append(change)
            done += reference[key].nbytes
            report_progress(0, key)
        del t  # release the mapping before the next tensor
    here.close()
    there.close()
    order = sorted((s.key for s in measured.tensors), key=_natural)
    return _Page(listing, measured, check(measured), histograms, largest, max_histograms,
                 comparison, order)


def _aliases(ckpt: Any, keys: list[str]) -> dict[str, str]:
    """Tied key -> the first key of its storage (the tensor is measured once, under that key)."""
    first: dict[str, str] = {}
    out: dict[str, str] = {}
    for key in keys:
        storage = ckpt[key].storage
        if storage is None:
            continue
        if storage in first:
            out[key] = first[storage]
        else:
            first[storage] = key
    return out


def _pair(ckpt: Any, reference: Any, keys: list[str],
          select: Selector | None) -> tuple[_Comparison, set[str]]:
    """The comparison to fill, and the keys whose shapes match in both checkpoints."""
    there = (list(reference) if select is None
             else select_names(reference, select, allow_empty=True))
    here = set(keys)
    comparison = _Comparison(str(reference.path), [], [k for k in keys if k not in reference],
                             [k for k in there if k not in here], {})
    common = set()
    for key in keys:
        if key not in reference:
            continue
        a, b = tuple(ckpt[key].shape), tuple(reference[key].shape)
        if a != b:
            comparison.not_compared[key] = f"shape {a} here, {b} in the reference"
        else:
            common.add(key)
    return comparison, common


class _OneKey:
    """One key of an opened checkpoint, as a checkpoint: what `stats` measures it through."""

    def __init__(self, ckpt: Any, key: str) -> None:
        self.reader, self.path, self._ckpt, self._key = ckpt.reader, ckpt.path, ckpt, key

    def keys(self) -> list[str]:
        return [self._key]

    def __getitem__(self, key: str) -> Any:
        return self._ckpt[key]

    def tensor(self, key: str) -> Any:
        return self._ckpt.tensor(key)


class _Values:
    """A checkpoint's tensors as numpy arrays of their stored elements with their dtype names:
    views of the mapped file where it allows, else read by torch (``None``: no data)."""

    def __init__(self, ckpt: Any) -> None:
        from .io._arrays import MappedArrays

        self.ckpt = ckpt
        self.arrays = None if ckpt is None else MappedArrays(ckpt)

    def get(self, key: str) -> tuple[np.ndarray | None, str]:
        array = self.arrays.get(key) if self.arrays is not None else None
        if array is not None:
            return array, self.ckpt[key].dtype
        t = self.ckpt.tensor(key)
        if t.device.type == "meta":
            return None, "meta"
        return kernel.from_torch(t)

    def close(self) -> None:
        if self.arrays is not None:
            self.arrays.close()


def _flat(values: tuple[np.ndarray | None, str]) -> tuple[np.ndarray, str]:
    """Stored elements as a 1-D real array (complex as real and imaginary parts)."""
    x, dtype = kernel.real_parts(*values)  # type: ignore[arg-type]  # callers pass data
    return x.reshape(-1), dtype


def _histogram(values: tuple[np.ndarray | None, str], s: TensorStats, bins: int) -> _Histogram | None:
    """Histogram of the finite values, in chunks; ``None`` when there is none."""
    lo, hi = s.min, s.max
    if not (math.isfinite(lo) and math.isfinite(hi)) or values[0] is None:
        return None
    if lo == hi:  # a constant: one bar in the middle of a unit-wide range
        pad = max(abs(lo) * 0.05, 0.5)
        lo, hi = lo - pad, hi + pad
    flat, dtype = _flat(values)
    counts = np.zeros(bins, dtype=np.int64)
    step = HIST_CHUNK // 2 if dtype == "float4_e2m1fn_x2" else HIST_CHUNK
    for i in range(0, flat.size, step):
        chunk = kernel.widen(flat[i:i + step], dtype, lambda n: np.empty(n, kernel.work_dtype(dtype)))
        if not s.finite:
            chunk = chunk[np.isfinite(chunk)]
        counts += np.histogram(chunk, bins=bins, range=(lo, hi))[0]
    return _Histogram(lo, hi, [int(c) for c in counts])


def _change(key: str, here: tuple[np.ndarray | None, str], there: tuple[np.ndarray | None, str],
            comparison: _Comparison) -> _Change | None:
    """``‖here − there‖ / ‖there‖`` and the largest ``|here − there|``, in float64 chunks."""
    if here[0] is None or there[0] is None:
        comparison.not_compared[key] = "no data (a meta tensor)"
        return None
    (a, da), (b, db) = kernel.comparable(*here, *there)
    if a is None or b is None:
        comparison.not_compared[key] = f"dtype {da} or {db} cannot be compared"
        return None
    diff2 = ref2 = peak = 0.0
    for pa, pb in kernel.pair_pieces(a, b, DIFF_CHUNK):
        x = kernel.widen(pa, da, lambda n: np.empty(n, np.float64), work=np.float64)
        y = kernel.widen(pb, db, lambda n: np.empty(n, np.float64), work=np.float64)
        d = x - y  # never in place: x may be the mapped array itself
        diff2 += float(np.dot(d, d))
        ref2 += float(np.dot(y, y))
        if d.size:
            peak = max(peak, float(np.max(np.abs(d))))
    diff_l2, ref_l2 = math.sqrt(diff2), math.sqrt(ref2)
    return _Change(key, _ratio(diff_l2, ref_l2), peak, diff_l2, ref_l2)


def _ratio(diff: float, ref: float) -> float:
    if ref > 0 or math.isnan(ref):
        return diff / ref
    return 0.0 if diff == 0 else math.inf  # moved away from all zeros


def _natural(key: str) -> list[Any]:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return [int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", key))]


def _layers(changes: list[_Change]) -> list[tuple[str, float, list[_Change]]]:
    """Changes rolled up per layer (the key without its last part), in natural order."""
    groups: dict[str, list[_Change]] = {}
    for c in changes:
        groups.setdefault(c.key.rpartition(".")[0] or c.key, []).append(c)
    out = []
    for layer in sorted(groups, key=_natural):
        members = groups[layer]
        diff = math.sqrt(sum(c.diff_l2 ** 2 for c in members))
        ref = math.sqrt(sum(c.ref_l2 ** 2 for c in members))
        out.append((layer, _ratio(diff, ref), members))
    return out


def _depth_grid(layers: list[tuple[str, float, list[_Change]]]
                ) -> tuple[list[str], list[int], list[list[float | None]]] | None:
    """Relative change per layer family (``layers.#.mlp``) and block index, for repeated blocks."""
    cells: dict[tuple[str, int], list[float]] = {}
    for layer, _, members in layers:
        m = re.search(r"(?:^|\.)(\d+)(?=\.|$)", layer)
        if m is None:
            continue
        acc = cells.setdefault((fold_name(layer), int(m.group(1))), [0.0, 0.0])
        acc[0] += sum(c.diff_l2 ** 2 for c in members)
        acc[1] += sum(c.ref_l2 ** 2 for c in members)
    indices = sorted({i for _, i in cells})
    if len(indices) < 3:
        return None
    families = sorted({f for f, _ in cells}, key=_natural)
    grid = [[_finite(_ratio(math.sqrt(cells[f, i][0]), math.sqrt(cells[f, i][1])))
             if (f, i) in cells else None for i in indices] for f in families]
    return families, indices, grid


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# ---------------------------------------------------------------- rendering


def _render(page: _Page, plotly: SimpleNamespace) -> str:
    figures = _Figures(plotly)
    parts = [_header(page), _findings(page)]
    if page.comparison is not None:
        parts.append(_comparison_section(page.comparison, figures))
    parts += [_heatmap_section(page, figures), _histogram_section(page, figures), _table(page)]
    title = f"weightsmith report: {Path(page.listing.path).name}"
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head><body>",
        '<pre id="ws-errors" hidden></pre>',
        f"<script>{ERROR_COLLECTOR}</script>",
        "<main>", *parts, "</main>",
        f'<footer>Written by weightsmith {_e(_version())}.</footer>',
        f'<script id="ws-data" type="application/json">{_data_json(page)}</script>',
        f"<script>{SORT_SCRIPT}</script>",
        f"<script>{DRILL_SCRIPT}</script>",
        "</body></html>",
    ])


class _Figures:
    """Plotly figures as HTML, plotly.js embedded in the first one only."""

    def __init__(self, plotly: SimpleNamespace) -> None:
        self.go, self.io, self.count = plotly.go, plotly.io, 0

    def html(self, fig: Any, *, toolbar: bool = True) -> str:
        fig.update_layout(template="plotly_white", font={"family": FONT, "size": 12},
                          paper_bgcolor="rgba(0,0,0,0)")
        self.count += 1
        return self.io.to_html(fig, include_plotlyjs=self.count == 1, full_html=False,
                               div_id=f"ws-fig-{self.count}", default_width="100%",
                               config={"displaylogo": False, "responsive": True,
                                       "displayModeBar": "hover" if toolbar else False})


def _header(page: _Page) -> str:
    listing, health = page.listing, page.health
    dtypes = ", ".join(f"{dt} ({v['tensors']})" for dt, v in listing.by_dtype.items())
    facts = [("format", listing.format), ("tensors", f"{listing.tensors:,}"),
             ("elements", f"{listing.elements:,}"), ("size", human_bytes(listing.nbytes)),
             ("dtypes", dtypes or "none")]
    if page.comparison is not None:
        facts.append(("compared with", Path(page.comparison.path).name))
    n_err, n_warn = len(health.errors), len(health.warnings)
    warned = f' ({n_warn} warning{"s" * (n_warn != 1)})' if n_warn else ""
    if health.ok:
        verdict = f'<div class="verdict ok">healthy{warned}</div>'
    else:
        tensors = len({f.key for f in health.errors})
        verdict = (f'<div class="verdict bad">{n_err} error{"s" * (n_err != 1)} in {tensors} '
                   f'tensor{"s" * (tensors != 1)}{warned}</div>')
    cells = "".join(f"<div><span>{_e(k)}</span><b>{_e(v)}</b></div>" for k, v in facts)
    return (f'<header><h1>Weights report</h1><p class="path">{_e(listing.path)}</p>'
            f'<div class="facts">{cells}{verdict}</div></header>')


def _findings(page: _Page) -> str:
    health = page.health
    out = ['<section id="health"><h2>Health</h2>']
    if not health.findings:
        out.append(f'<p class="ok-note">No NaN, Inf, all-zero, constant or exploding tensor among '
                   f'the {health.checked:,} checked (exploding: |x| &gt; {health.max_abs:g}).</p>')
    else:
        rows = "".join(
            f'<tr class="{_severity(f)}"><td class="name">{_e(f.key)}</td>'
            f'<td><span class="badge {_severity(f)}">{_e(f.kind)}</span></td>'
            f'<td>{_e(f.severity)}</td><td>{_e(f.message)}</td></tr>' for f in health.findings)
        out.append('<table class="findings"><thead><tr><th>tensor</th><th>finding</th><th>severity</th>'
                   f'<th>detail</th></tr></thead><tbody>{rows}</tbody></table>')
    if health.skipped:
        out.append("<p>Not readable, so not checked: " + ", ".join(
            f'<span class="name">{_e(k)}</span> ({_e(why)})' for k, why in health.skipped.items())
            + "</p>")
    out.append("</section>")
    return "".join(out)


def _severity(f: Finding) -> str:
    return "bad" if f.severity == "error" else "warn"


def _comparison_section(comparison: _Comparison, figures: _Figures) -> str:
    go = figures.go
    out = ['<section id="changes"><h2>Change from the reference</h2>',
           f'<p>Relative L2 change ‖this − reference‖ / ‖reference‖ per layer, against '
           f'<span class="name">{_e(comparison.path)}</span>: what training moved. '
           f'{len(comparison.changes):,} tensors compared.</p>']
    for label, keys in (("Only in this checkpoint", comparison.only_here),
                        ("Only in the reference", comparison.only_there)):
        if keys:
            out.append(f"<p>{label}: {_name_list(keys)}</p>")
    if comparison.not_compared:
        out.append("<p>Not compared: " + ", ".join(
            f'<span class="name">{_e(k)}</span> ({_e(why)})'
            for k, why in comparison.not_compared.items()) + "</p>")
    layers = _layers(comparison.changes)
    if layers:
        names = [name for name, _, _ in layers]
        hover = ["<br>".join(f"{c.key}: {c.rel_l2:.3g} (max |Δ| {c.max_abs:.3g})"
                             for c in members[:12]) for _, _, members in layers]
        values = [v if math.isfinite(v) else 0.0 for _, v, _ in layers]  # labelled below
        fig = go.Figure(go.Bar(
            x=values, y=names, orientation="h", marker_color="#3b6ea8", customdata=hover,
            text=[_change_label(v) for _, v, _ in layers],
            textposition="outside", cliponaxis=False,
            hovertemplate="<b>%{y}</b><br>layer: %{x:.4g}<br>%{customdata}<extra></extra>"))
        fig.update_layout(title="Relative L2 change per layer", height=110 + 24 * len(layers),
                          margin={"l": 10, "r": 60, "t": 50, "b": 40}, bargap=0.25)
        fig.update_yaxes(autorange="reversed", automargin=True, tickfont={"family": MONO})
        fig.update_xaxes(title="‖this − reference‖ / ‖reference‖", rangemode="tozero")
        out.append(f'<div class="card">{figures.html(fig)}</div>')
        grid = _depth_grid(layers)
        if grid is not None:
            families, indices, z = grid
            fig = go.Figure(go.Heatmap(
                z=z, x=[str(i) for i in indices], y=families, colorscale="Blues", zmin=0,
                colorbar={"title": "rel. L2", "nticks": 4, "thickness": 12}, hoverongaps=False,
                xgap=1, ygap=1,
                hovertemplate="%{y} at %{x}: %{z:.4g}<extra></extra>"))
            fig.update_layout(title="Relative L2 change by depth (# = block index)",
                              height=140 + 26 * len(families), plot_bgcolor="#e9ecef",
                              margin={"l": 10, "r": 10, "t": 50, "b": 50})
            fig.update_yaxes(autorange="reversed", automargin=True, tickfont={"family": MONO})
            fig.update_xaxes(title="block index", type="category")
            out.append(f'<div class="card">{figures.html(fig)}</div>')
    out.append("</section>")
    return "".join(out)


def _change_label(value: float) -> str:
    if math.isnan(value):
        return "NaN (non-finite values)"
    return f"{value:.3g}" if math.isfinite(value) else "∞ (moved from all zeros)"


# name, scale: means are signed and cluster near 0 or 1; spreads and magnitudes span decades
_HEAT_COLUMNS = (("mean", "symlog"), ("std", "log"), ("absmax", "log"), ("zeros %", "linear"))


def _heatmap_section(page: _Page, figures: _Figures) -> str:
    go = figures.go
    by_key = {s.key: s for s in page.stats.tensors}
    # step counters and position ids are not weights: they would set every column's range
    rows = [by_key[k] for k in page.order if by_key[k].dtype.startswith(_FLOATING)]
    left_out = len(page.order) - len(rows)
    out = ['<section id="heatmap"><h2>Statistics by block</h2>',
           "<p>One row per block (a layer with its index, or a module), its tensors pooled: the "
           "mean and std over all their values, the largest magnitude, the share of zeros. Each "
           "column is scaled on its own from its lowest (dark) to its highest (bright) value: std "
           "and absmax on a log scale, the mean on a symmetric log scale around 0. Hover for the "
           "values; click a block to list its tensors in the table below."
           + (f" Integer and bool tensors ({left_out}) are left out; they are in the table."
              if left_out else "") + "</p>"]
    if not rows:
        out.append("<p>No floating-point tensor to show.</p></section>")
        return "".join(out)
    blocks: dict[str, list[TensorStats]] = {}
    for s in rows:
        blocks.setdefault(block_name(s.key), []).append(s)
    raw = [_pooled(members) for members in blocks.values()]
    columns = list(zip(*raw))
    scaled = [_normalize(col, scale) for col, (_, scale) in zip(columns, _HEAT_COLUMNS)]
    z = [list(r) for r in zip(*scaled)]
    text = [[f"{v:.3g}" for v in r] for r in raw]
    labels = [name if scale == "linear" else f"{name} ({scale})" for name, scale in _HEAT_COLUMNS]
    names = list(blocks)
    counts = [f"{len(m)} tensor{'s' * (len(m) != 1)}" for m in blocks.values()]
    n = len(names)
    fig = go.Figure(go.Heatmap(
        z=z, x=labels, y=names, customdata=[[f"{t} · {c}" for t in r] for r, c in zip(text, counts)],
        zmin=0, zmax=1, colorscale="Viridis", xgap=1, ygap=1 if n < 120 else 0, hoverongaps=False,
        text=text if n <= 80 else None, texttemplate="%{text}" if n <= 80 else None,
        colorbar={"tickvals": [0, 1], "ticktext": ["lowest", "highest"], "thickness": 12},
        hovertemplate="<b>%{y}</b><br>%{x}: %{customdata}<extra></extra>"))
    fig.update_layout(height=130 + 22 * n, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    fig.update_xaxes(side="top")
    fig.update_yaxes(autorange="reversed", automargin=True, tickfont={"family": MONO, "size": 11})
    figure = figures.html(fig)
    fig_id = f"ws-fig-{figures.count}"
    out.append(f'<div class="card heat" data-drill="{fig_id}">{figure}</div></section>')
    return "".join(out)


def _pooled(members: list[TensorStats]) -> list[float]:
    """mean, std, absmax and zeros % of several tensors' values taken together."""
    n = sum(s.numel for s in members)
    if not n:
        return [math.nan, math.nan, math.nan, 0.0]
    mean = sum(s.numel * s.mean for s in members) / n
    square = sum(s.numel * (s.std ** 2 + s.mean ** 2) for s in members) / n
    std = math.sqrt(max(square - mean ** 2, 0.0)) if math.isfinite(square) else math.nan
    absmax = max(s.absmax for s in members)
    zeros = 100 * sum(s.numel * s.zero_fraction for s in members) / n
    return [mean, std, absmax, zeros]


def _normalize(values: tuple[float, ...], scale: str) -> list[float | None]:
    """Scale to [0, 1]; ``None`` for values not measured.

    ``log``: zero and below map to the smallest positive value. ``symlog``: sign(v)·log10(1 +
    |v|/c), with c the median nonzero magnitude, so small means of either sign stay apart.
    """
    finite = [v for v in values if math.isfinite(v)]
    keyed: list[float | None] = [v if math.isfinite(v) else None for v in values]
    if scale == "log":
        positive = [v for v in finite if v > 0]
        floor = math.log10(min(positive)) if positive else 0.0
        keyed = [None if v is None else math.log10(v) if v > 0 else floor for v in keyed]
    elif scale == "symlog":
        sizes = sorted(abs(v) for v in finite if v != 0)
        c = sizes[len(sizes) // 2] if sizes else 1.0
        keyed = [None if v is None else math.copysign(math.log10(1 + abs(v) / c), v)
                 for v in keyed]
    present = [v for v in keyed if v is not None]
    if not present:
        return [None] * len(values)
    lo, hi = min(present), max(present)
    return [None if v is None else (0.0 if hi == lo else (v - lo) / (hi - lo)) for v in keyed]


def _histogram_section(page: _Page, figures: _Figures) -> str:
    go = figures.go
    measured = len(page.stats.tensors)
    shown = [k for k in page.order if k in page.histograms]
    flagged = {f.key: f for f in reversed(page.health.findings)}  # the first finding per tensor
    by_size = sum(k in page.largest for k in shown)
    out = ['<section id="histograms"><h2>Histograms</h2>']
    if page.max_histograms == 0:
        note = "Histograms are turned off (max_histograms=0)."
    elif len(shown) == measured:
        note = f"Every tensor ({measured:,}), finite values only, {_bins(page)} bins each."
    else:
        note = (f"Showing {len(shown):,} of {measured:,} tensors: the {by_size:,} largest"
                + (f" and {len(shown) - by_size:,} more with findings" if len(shown) > by_size
                   else "")
                + f" (max_histograms={page.max_histograms}). Finite values only; every tensor "
                "is in the table.")
    out.append(f'<p class="note">{_e(note)}</p><div class="grid">')
    by_key = {s.key: s for s in page.stats.tensors}
    for key in shown:
        h, s = page.histograms[key], by_key[key]
        width = (h.hi - h.lo) / len(h.counts)
        centers = [h.lo + (i + 0.5) * width for i in range(len(h.counts))]
        finding = flagged.get(key)
        color = "#cf222e" if finding is not None and finding.kind in _SEVERE else (
            "#bf8700" if finding is not None else "#3b6ea8")
        fig = go.Figure(go.Bar(
            x=centers, y=h.counts, width=width, marker_color=color, marker_line_width=0,
            hovertemplate="%{x:.4g}: %{y:,}<extra></extra>"))
        positive = [c for c in h.counts if c > 0]
        log = bool(positive) and max(positive) > 1000 * min(positive)  # outliers stay visible
        fig.update_layout(height=190, margin={"l": 45, "r": 10, "t": 8, "b": 30}, bargap=0,
                          showlegend=False)
        fig.update_yaxes(type="log" if log else "linear", tickfont={"size": 10})
        fig.update_xaxes(tickfont={"size": 10}, exponentformat="e")
        badge = (f' <span class="badge {_severity(finding)}">{_e(finding.kind)}</span>'
                 if finding is not None else "")
        out.append(
            f'<div class="card hist"><div class="hist-title"><span class="name">{_e(key)}</span>'
            f'{badge}</div><div class="hist-sub">{_e(str(s.shape))} {_e(s.dtype)} · mean '
            f'{s.mean:.3g} · std {s.std:.3g}{" · log count" if log else ""}</div>'
            f'{figures.html(fig, toolbar=False)}</div>')
    out.append("</div></section>")
    return "".join(out)


def _bins(page: _Page) -> int:
    return len(next(iter(page.histograms.values())).counts) if page.histograms else 0


def _table(page: _Page) -> str:
    by_key = {s.key: s for s in page.stats.tensors}
    aliases = page.stats.aliases
    kinds: dict[str, list[str]] = {}
    for f in page.health.findings:
        kinds.setdefault(f.key, []).append(f.kind)
    changes = ({c.key: c for c in page.comparison.changes}
               if page.comparison is not None else None)
    heads = ["name", "shape", "dtype", "params", "mean", "std", "absmax", "zeros %"]
    heads += ["rel. change"] if changes is not None else []
    heads.append("findings")
    rows = []
    for row in sorted(page.listing.rows, key=lambda r: _natural(r.key)):
        measured_as = aliases.get(row.key, row.key)
        s = by_key.get(measured_as)
        found = kinds.get(measured_as, [])
        name = _e(row.key) + (f' <span class="tied">= {_e(measured_as)}</span>'
                              if measured_as != row.key else "")
        cells = [f'<td class="name">{name}</td>',
                 f'<td data-v="{row.numel}">{_e(str(tuple(row.shape)))}</td>',
                 f"<td>{_e(row.dtype)}</td>", _num(row.numel, f"{row.numel:,}")]
        if s is None:
            why = page.stats.skipped.get(row.key, "not measured")
            cells.append(f'<td colspan="4" class="muted">{_e(why)}</td>')
        else:
            cells += [_num(s.mean), _num(s.std), _num(s.absmax),
                      _num(100 * s.zero_fraction, f"{100 * s.zero_fraction:.1f}")]
        if changes is not None:
            c = changes.get(row.key)
            cells.append(_num(c.rel_l2) if c is not None else '<td class="muted">—</td>')
        cells.append("<td>" + " ".join(f'<span class="badge {"bad" if k in _SEVERE else "warn"}">'
                                       f"{_e(k)}</span>" for k in found) + "</td>")
        css = ("bad" if set(found) & set(_SEVERE) else "warn") if found else ""
        rows.append(f'<tr class="{css}" data-block="{_e(block_name(row.key))}">' + "".join(cells) + "</tr>")
    head = "".join(f"<th>{_e(h)}</th>" for h in heads)
    return ('<section id="parameters"><h2>Parameters</h2><p class="drill" id="ws-drill" hidden>'
            '<span></span> <button type="button">show all</button></p>'
            '<p class="note">Click a column to sort. '
            f'{_e(page.listing.tensors)} tensors, {page.listing.elements:,} elements (tied '
            f'tensors counted once).</p><div class="table-wrap"><table class="params sortable">'
            f'<thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div></section>')


def _num(value: float, text: str | None = None) -> str:
    shown = text if text is not None else f"{value:.4g}"
    key = repr(float(value)) if math.isfinite(value) else {"nan": "NaN", "inf": "Infinity",
                                                             "-inf": "-Infinity"}[str(value)]
    return f'<td class="num" data-v="{key}">{_e(shown)}</td>'


def _name_list(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(f'<span class="name">{_e(k)}</span>' for k in keys[:limit])
    return shown + (f" and {len(keys) - limit:,} more" if len(keys) > limit else "")


def _data_json(page: _Page) -> str:
    """The numbers behind the page, as JSON safe to embed in a script element."""
    data: dict[str, Any] = {
        "schema": SCHEMA, "source": page.listing.path, "format": page.listing.format,
        "tensors": page.listing.tensors, "parameters": page.listing.parameters,
        "nbytes": page.listing.nbytes, "ok": page.health.ok,
        "stats": page.stats.tensors, "aliases": page.stats.aliases,
        "skipped": page.stats.skipped, "findings": page.health.findings,
        "order": page.order, "histograms": page.histograms,
    }
    if page.comparison is not None:
        c = page.comparison
        data["compare"] = {
            "source": c.path, "changes": c.changes, "only_here": c.only_here,
            "only_there": c.only_there, "not_compared": c.not_compared,
            "layers": [{"layer": name, "rel_l2": value, "tensors": [m.key for m in members]}
                       for name, value, members in _layers(c.changes)]}
    text = json.dumps(to_plain(data), separators=(",", ":"))
    return text.replace("<", "\\u003c")  # no "</script>" can end the element early


def _version() -> str:
    from . import __version__

    return __version__


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
