"""`merge_plan`: what a merge will read and compute for every output key, from headers alone.

The inputs' key names are aligned the way `weightsmith.plan` aligns a source to a target
(wrapper prefixes such as ``module.`` and ``_orig_mod.`` need no rule): the output is named
after the base, or the first input when there is no base, with training-wrapper prefixes
removed. Every problem is collected before any tensor is read: a key missing from one input,
a shape or dtype conflict, a method that needs a base, a parameter no selector covers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._result import Result
from ..errors import UsageError
from ..warmstart.keymap import align_prefixes, natural_key
from . import params as P
from .methods import METHODS, NEEDS_BASE, Params

__all__ = ["merge_plan", "MergePlan", "MergeStep", "Input", "open_input", "is_float", "output_dtype_name"]

# prefixes a training wrapper puts on every key; the output never keeps them
_TRAINING_WRAPPERS = ("module.", "_orig_mod.", "_forward_module.")

# parameter -> the methods that take it (``weights`` and ``layers`` are handled apart)
_TAKES: dict[str, tuple[str, ...]] = {
    "normalize": ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"),
    "density": ("ties", "dare_linear", "dare_ties"),
    "densities": ("ties", "dare_linear", "dare_ties"),
    "lambda_": ("task_arithmetic", "ties", "dare_linear", "dare_ties"),
    "consensus": ("ties", "dare_ties"),
    "rescale": ("dare_linear", "dare_ties"),
    "seed": ("dare_linear", "dare_ties"),
    "t": ("slerp",),
    "slices": ("passthrough",),
    "layers": METHODS,
}
_WEIGHTED = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")


# -- inputs -----------------------------------------------------------------------------------
@dataclass
class Input:
    """One merge input: names, shapes and dtypes from its header; tensors on demand."""

    name: str
    specs: dict[str, tuple[tuple[int, ...], str]]
    tensor: Callable[[str], Any]
    release: Callable[[str], None] = lambda _k: None
    ties: list[tuple[str, ...]] = field(default_factory=list)
    path: Path | None = None
    close: Callable[[], None] = lambda: None  # set when the input was opened here from a path


def open_input(source: Any, *, trust: bool = False) -> Input:
    """An `Input` from a path (anything `weightsmith.open` reads), a `Checkpoint`, a state dict or a model."""
    from ..checkpoint import Checkpoint, open as open_checkpoint

    from ..io.hub import is_hub

    if isinstance(source, Input):
        return source
    opened = isinstance(source, (str, Path))
    label = str(source) if opened and is_hub(source) else None  # hf://…, not its place in the cache
    if opened:
        source = open_checkpoint(source, trust=trust)
    if isinstance(source, Checkpoint):
        specs = {k: (tuple(i.shape), i.dtype) for k, i in source.items()}
        return Input(label or str(source.path), specs, source.tensor, source.release, source.ties, Path(source.path),
                     source.close if opened else (lambda: None))
    if hasattr(source, "state_dict") and callable(source.state_dict):
        name, state = f"<{type(source).__name__}>", source.state_dict()
    elif isinstance(source, Mapping):
        name, state = "<state dict>", source
    else:
        raise UsageError(f"cannot merge a {type(source).__name__}: give a path, a Checkpoint, a state dict "
                         "or a model")
    values = {k: v for k, v in state.items() if hasattr(v, "shape") and hasattr(v, "dtype")}
    specs = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in values.items()}
    groups: dict[tuple[Any, ...], list[str]] = {}
    for k, v in values.items():
        if v.device.type != "meta" and v.numel():
            ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
            groups.setdefault(ident, []).append(k)
    return Input(name, specs, values.__getitem__, ties=[tuple(g) for g in groups.values() if len(g) > 1])


def _strip_wrappers(keys: Sequence[str]) -> str:
    """The training-wrapper prefix (any nesting) shared by every key, or ``""``."""
    prefix = ""
    while keys:
        for w in _TRAINING_WRAPPERS:
            if all(k.startswith(prefix + w) for k in keys):
                prefix += w
                break
        else:
            return prefix
    return prefix


def is_float(dtype: str) -> bool:
    """Whether a dtype name is a floating-point kind (merged), not an integer or bool (copied)."""
    return dtype.startswith(("float", "bfloat"))


# -- the plan ---------------------------------------------------------------------------------
@dataclass
class MergeStep:
    """How one output key is computed.

    Attributes:
        key: the output key; ``shape`` and ``dtype`` what is written.
        how: ``merge`` (the method), ``copy`` (a non-float tensor copied from the base or first
            input), ``tied`` (stored once, through ``tied_to``), ``layer`` (a passthrough copy).
        reads: ``(source index, key)`` pairs, indices into `MergePlan.sources`.
        params: the parameters resolved for this key (numbers only).
    """

    key: str
    shape: tuple[int, ...]
    dtype: str
    how: str
    reads: tuple[tuple[int, str], ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    tied_to: str | None = None
    note: str = ""

    @property
    def nbytes(self) -> int:
        from ..io._dtypes import nbytes_of

        n = 1
        for d in self.shape:
            n *= d
        return nbytes_of(self.dtype, n)


@dataclass
class MergePlan(Result):
    """What `merge` will read and compute for every output key, and every problem found."""

    SCHEMA = "weightsmith.merge-plan/1"
    method: str
    sources: list[str]
    base: int | None
    parameters: dict[str, Any]
    dtype: str | None
    prefixes: list[str]
    layers: str | None
    steps: list[MergeStep]
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes the output holds (tied keys once)."""
        return sum(s.nbytes for s in self.steps if s.how != "tied")

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.steps:
            out[s.how] = out.get(s.how, 0) + 1
        return out

    def verdict(self) -> str:
        if self.problems:
            return f"cannot merge: {len(self.problems)} problem(s)"
        return f"ready to merge {len(self.steps)} key(s) with {self.method}"

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["counts"] = self.counts()
        d["nbytes"] = self.nbytes
        return d

    def _rich_(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        from ..listing import fold_name

        table = Table(title=f"merge plan: {self.method}", title_justify="left")
        for col in ("output (# = any index)", "how", "reads", "parameters / note"):
            table.add_column(col, overflow="fold")
        rows: dict[tuple[str, ...], int] = {}
        for s in self.steps:
            reads = ", ".join(f"#{i}:{fold_name(k)}" for i, k in s.reads) if s.how != "tied" else f"= {s.tied_to}"
            detail = ", ".join(f"{k}={_short(v)}" for k, v in s.params.items())
            if s.note:
                detail = f"{detail}; {s.note}" if detail else s.note
            row = (fold_name(s.key), s.how, fold_name(reads), detail)
            rows[row] = rows.get(row, 0) + 1
        for row, n in rows.items():
            table.add_row(row[0] + (f"  ×{n}" if n > 1 else ""), *row[1:])
        lines = []
        for i, name in enumerate(self.sources):
            role = "base" if i == self.base else "input"
            lines.append(f"#{i} {role}: {name} (prefix: {self.prefixes[i]})")
        if self.parameters:
            lines.append("parameters: " + json.dumps(self.parameters))
        if self.layers is not None:
            lines.append(f"layer stack: {self.layers or '(top level)'}")
        lines += [f"note: {n}" for n in self.notes]
        shown = self.problems[:30]
        lines += [f"problem: {p}" for p in shown]
        if len(self.problems) > len(shown):
            lines.append(f"... and {len(self.problems) - len(shown)} more problem(s) (see --json)")
        lines.append(self.verdict())
        return Group(table, Text("\n".join(lines)))


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    return str(v)


def merge_plan(sources: Sequence[Any], *, method: str, base: Any = None, weights: Sequence[Any] | None = None,
               dtype: Any = None, trust: bool = False, **params: Any) -> MergePlan:
    """Plan a merge from the inputs' headers: nothing is read but names, shapes and dtypes.

    Args:
        sources: the models to merge: paths (anything `weightsmith.open` reads), `Checkpoint`
            objects, state dicts or models.
        method: one of ``linear``, ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``,
            ``slerp``, ``model_stock``, ``passthrough`` (formulas in `weightsmith.merging.methods`).
        base: the model the task vectors are taken from (needed by task vector methods and
            ``model_stock``; for ``slerp`` the t=0 end).
        weights: one per input (not the base); each a number or a per-key spec (see below).
            Default: 1 each.
        dtype: the output dtype of floating tensors (default: the base's, else the first input's).
        trust: passed to `weightsmith.open` for torch files whose pickle calls code.
        **params: ``t``, ``density`` (ties/dare: the fraction of each task vector kept),
            ``densities`` (one per input), ``lambda_``, ``normalize``, ``consensus`` (``"sum"`` or
            ``"count"``), ``rescale``, ``seed``, ``slices`` (passthrough: ``[(input, start, stop),
            ...]`` layer ranges, stacked in order), ``layers`` (the layer stack's container, if
            not the detected one). Numeric parameters take a number, a gradient over the layers
            (``[0, 0.5, 1]``) or ``(selector, value)`` pairs: ``t=[("**.attn.**", [0, 0.5, 1]), ("**", 0.5)]``.

    Returns:
        a `MergePlan`; ``problems`` lists why `merge` would refuse it.

    >>> import weightsmith as ws                                                    # doctest: +SKIP
    >>> print(ws.merge_plan(["a.safetensors", "b.safetensors"], method="ties",      # doctest: +SKIP
    ...                     base="base.safetensors", density=0.5))
    """
    p, inputs = build(sources, method=method, base=base, weights=weights, dtype=dtype, trust=trust, **params)
    for i in inputs:
        i.close()
    return p


def build(sources: Sequence[Any], *, method: str, base: Any = None, weights: Sequence[Any] | None = None,
          dtype: Any = None, trust: bool = False, **params: Any) -> tuple[MergePlan, list[Input]]:
    """`merge_plan`, also returning the opened inputs (base first) for `merge` to read."""
    if method not in METHODS:
        raise UsageError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    _check_params(method, weights, params)
    if isinstance(sources, (str, Path, Mapping)) or not isinstance(sources, Sequence):
        raise UsageError("sources must be a list of models (paths, checkpoints, state dicts)")
    inputs = [open_input(s, trust=trust) for s in sources]
    problems: list[str] = []
    base_in = open_input(base, trust=trust) if base is not None else None
    everything = ([base_in] if base_in is not None else []) + inputs
    offset = 1 if base_in is not None else 0
    _check_counts(method, len(inputs), base_in is not None, weights, params, problems)
    out_dtype = output_dtype_name(dtype)

    # names: the reference without wrapper prefixes; every source aligned to it
    ref = everything[0] if everything else None
    if ref is None:
        raise UsageError("merge needs at least one input")
    ref_keys = list(ref.specs)
    wrap = _strip_wrappers(ref_keys)
    canonical = [k[len(wrap):] for k in ref_keys]
    maps: list[dict[str, str]] = []  # per source: canonical name -> its own key
    prefixes: list[str] = []
    for src in everything:
        aliases = {k for g in src.ties for k in g[1:]}
        own = [k for k in src.specs if k not in aliases] or list(src.specs)
        pm = align_prefixes(own, canonical)
        maps.append({pm(k): k for k in src.specs})
        prefixes.append(pm.describe())
    layers = P.find_layers(canonical, params.get("layers"))
    if params.get("layers") is not None and layers is None:
        problems.append(f"layers={params['layers']!r}: no keys '{params['layers']}.<index>.*' in {ref.name}")

    ref_ties = {}
    for g in ref.ties:
        for k in g[1:]:
            ref_ties[k[len(wrap):]] = g[0][len(wrap):]
    notes: list[str] = []
    if method == "passthrough" and params.get("slices"):
        steps = _slice_steps(everything, maps, canonical, layers, params["slices"], offset, out_dtype, problems)
    else:
        steps = _merge_steps(method, everything, maps, canonical, ref_ties, layers, weights, params, offset,
                             out_dtype, problems, notes)
        if method not in ("passthrough",):
            _extra_keys(everything, maps, set(canonical), problems)
    described = {k: P.describe(v) if k not in ("slices", "layers", "consensus", "normalize", "rescale", "seed")
                 else v for k, v in params.items()}
    if weights is not None:
        described["weights"] = [P.describe(w) for w in weights]
    plan = MergePlan(method=method, sources=[s.name for s in everything],
                     base=0 if base_in is not None else None, parameters=_plain(described), dtype=out_dtype,
                     prefixes=prefixes, layers=layers.container if layers is not None else None,
                     steps=steps, problems=problems, notes=notes)
    return plan, everything


def _plain(value: Any) -> Any:
    from .._result import to_plain

    return to_plain(value)


def output_dtype_name(dtype: Any) -> str | None:
    """The output dtype asked for (a torch dtype or a name, ``"bf16"`` too) as a weightsmith dtype name."""
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    aliases = {"half": "float16", "float": "float32", "double": "float64", "bf16": "bfloat16",
               "fp16": "float16", "fp32": "float32"}
    name = aliases.get(name, name)
    if name not in ("float16", "bfloat16", "float32", "float64"):
        raise UsageError(f"dtype={dtype!r}: give float16, bfloat16, float32 or float64")
    return name


def _check_params(method: str, weights: Any, params: Mapping[str, Any]) -> None:
    unknown = [k for k in params if k not in _TAKES]
    if unknown:
        raise UsageError(f"unknown merge parameter(s) {', '.join(unknown)}; known: {', '.join(_TAKES)}, weights")
    wrong = [k for k in params if method not in _TAKES[k]]
    if weights is not None and method not in _WEIGHTED:
        wrong.append("weights")
    if wrong:
        raise UsageError(f"{method} takes no {', '.join(wrong)}")
    for k in ("t", "density", "lambda_"):
        if k in params:
            P.check_spec(k, params[k])
    for w in weights or ():
        P.check_spec("weights", w)
    for d in params.get("densities") or ():
        P.check_spec("densities", d)
    if params.get("consensus", "sum") not in ("sum", "count"):
        raise UsageError(f"consensus={params['consensus']!r}: give 'sum' or 'count'")


def _check_counts(method: str, n: int, has_base: bool, weights: Any, params: Mapping[str, Any],
                  problems: list[str]) -> None:
    if method in NEEDS_BASE and not has_base:
        problems.append(f"{method} needs a base model (base=...): its task vectors are differences from it")
    if method == "linear" and has_base:
        problems.append("linear takes no base: list every model to average among the sources")
    if method == "slerp" and n + has_base != 2:
        problems.append(f"slerp takes exactly two models (a base and one input, or two inputs); got {n + has_base}")
    if method == "model_stock" and n < 2:
        problems.append(f"model_stock needs at least two fine-tuned inputs besides the base; got {n}")
    if method in ("ties", "dare_linear", "dare_ties") and "density" not in params and "densities" not in params:
        problems.append(f"{method} needs density= (the fraction of each task vector kept, e.g. 0.5)")
    if method == "passthrough" and not params.get("slices") and n + has_base != 1:
        problems.append("passthrough without slices copies one model; give slices=[(input, start, stop), ...] "
                        "to stack layer ranges of several")
    if n == 0 and method != "passthrough":
        problems.append("no inputs to merge")
    if weights is not None and len(weights) != n:
        problems.append(f"weights has {len(weights)} value(s) for {n} input(s); give one per input (not the base)")
    dens = params.get("densities")
    if dens is not None and len(dens) != n:
        problems.append(f"densities has {len(dens)} value(s) for {n} input(s); give one per input")


def _merge_steps(method: str, everything: list[Input], maps: list[dict[str, str]], canonical: list[str],
                 ref_ties: dict[str, str], layers: P.Layers | None, weights: Any, params: dict[str, Any],
                 offset: int, out_dtype: str | None, problems: list[str], notes: list[str]) -> list[MergeStep]:
    steps: list[MergeStep] = []
    uncovered: dict[str, list[str]] = {}
    copied = 0
    for name in canonical:
        ref_key = maps[0][name]
        shape, ref_dtype = everything[0].specs[ref_key]
        if name in ref_ties:
            steps.append(MergeStep(name, shape, _out(ref_dtype, out_dtype), "tied", tied_to=ref_ties[name],
                                   note=f"tied to {ref_ties[name]} (merged once)"))
            continue
        if not is_float(ref_dtype):  # copied from #0 whatever the others hold (they may lack it)
            steps.append(MergeStep(name, shape, ref_dtype, "copy", ((0, ref_key),),
                                   note=f"{ref_dtype}: copied from #0, not averaged"))
            copied += 1
            continue
        reads = []
        bad = False
        for i, src in enumerate(everything):
            key = maps[i].get(name)
            if key is None:
                problems.append(f"{name}: missing from #{i} {src.name}")
                bad = True
                continue
            s_shape, s_dtype = src.specs[key]
            if s_shape != shape:
                problems.append(f"{name}: shape {list(s_shape)} in #{i} {src.name}, {list(shape)} in "
                                f"#0 {everything[0].name}")
                bad = True
            elif is_float(s_dtype) != is_float(ref_dtype):
                problems.append(f"{name}: dtype {s_dtype} in #{i} {src.name}, {ref_dtype} in #0 "
                                f"{everything[0].name} (a floating and a non-floating tensor cannot be merged)")
                bad = True
            reads.append((i, key))
        if method == "passthrough":
            steps.append(MergeStep(name, shape, _out(ref_dtype, out_dtype), "layer", ((0, ref_key),)))
            continue
        resolved = _resolve(method, name, layers, weights, params, len(everything) - offset, uncovered)
        steps.append(MergeStep(name, shape, _out(ref_dtype, out_dtype), "merge", tuple(reads) if not bad else (),
                               resolved))
    for pname, keys in uncovered.items():
        problems.append(f"parameter {pname}: no selector matches {len(keys)} key(s), e.g. {keys[0]}; end the "
                        "list with a catch-all ('**', value)")
    if copied:
        notes.append(f"{copied} non-floating tensor(s) (integer buffers, masks) copied from #0, not merged")
    if ref_ties:
        notes.append(f"{len(ref_ties)} tied key(s) in #0 merged once and stored as ties")
    return steps


def _out(ref_dtype: str, out_dtype: str | None) -> str:
    return out_dtype if out_dtype is not None and is_float(ref_dtype) else ref_dtype


def _resolve(method: str, key: str, layers: P.Layers | None, weights: Any, params: dict[str, Any], n: int,
             uncovered: dict[str, list[str]]) -> dict[str, Any]:
    def val(pname: str, spec: Any) -> float:
        v = P.resolve(spec, key, layers)
        if v is None:
            uncovered.setdefault(pname, []).append(key)
            return 0.0
        return v

    out: dict[str, Any] = {}
    if method in _WEIGHTED:
        out["weights"] = [val("weights", w) for w in weights] if weights is not None else [1.0] * n
    if method in ("ties", "dare_linear", "dare_ties"):
        dens = params.get("densities")
        out["density"] = ([val("densities", d) for d in dens] if dens is not None
                          else [val("density", params.get("density", 1.0))] * n)
    if method in _TAKES["lambda_"]:
        out["lambda_"] = val("lambda_", params.get("lambda_", 1.0))
    if method == "slerp":
        out["t"] = val("t", params.get("t", 0.5))
    return out


def params_of(step: MergeStep, plan: MergePlan, raw: Mapping[str, Any]) -> Params:
    """The `Params` one step is computed with."""
    normalize = raw.get("normalize", plan.method in ("linear", "ties"))
    return Params(weights=list(step.params.get("weights", [])), density=list(step.params.get("density", [])),
                  t=step.params.get("t", 0.5), lambda_=step.params.get("lambda_", 1.0),
                  normalize=bool(normalize), consensus=raw.get("consensus", "sum"),
                  rescale=bool(raw.get("rescale", True)), seed=int(raw.get("seed", 0)))


def _extra_keys(everything: list[Input], maps: list[dict[str, str]], names: set[str], problems: list[str]) -> None:
    for i, src in enumerate(everything[1:], start=1):
        aliases = {k for g in src.ties for k in g[1:]}
        extra = sorted((own for name, own in maps[i].items() if name not in names and own not in aliases),
                       key=natural_key)
        for own in extra:
            problems.append(f"{own}: in #{i} {src.name} but not in #0 {everything[0].name}; the merge would "
                            "drop it")


def _slice_steps(everything: list[Input], maps: list[dict[str, str]], canonical: list[str],
                 layers: P.Layers | None, slices: Any, offset: int, out_dtype: str | None,
                 problems: list[str]) -> list[MergeStep]:
    """Passthrough with layer ranges: non-layer keys from #0, layers stacked and renumbered."""
    if layers is None:
        problems.append("slices need a layer stack ('<container>.<index>.' keys); none found, name it with layers=")
        return []
    lead = layers.container + "." if layers.container else ""
    steps: list[MergeStep] = []
    for name in canonical:
        if layers.index_of(name) is None:
            shape, dt = everything[0].specs[maps[0][name]]
            steps.append(MergeStep(name, shape, _out(dt, out_dtype), "layer", ((0, maps[0][name]),),
                                   note="outside the layer stack: from #0"))
    new = 0
    for item in slices:
        try:
            which, start, stop = item
            i = int(which) + offset
            start, stop = int(start), int(stop)
        except (TypeError, ValueError):
            raise UsageError(f"slice {item!r}: give (input index, start layer, stop layer)") from None
        if not 0 <= i < len(everything):
            problems.append(f"slice {list(item)}: there is no input {which}")
            continue
        src_names = [n for n in maps[i] if n.startswith(lead)]
        for layer in range(start, stop):
            found = False
            for n in src_names:
                if layers.index_of(n) != layer:
                    continue
                found = True
                rest = n[len(lead):].split(".", 1)[1]
                own = maps[i][n]
                shape, dt = everything[i].specs[own]
                steps.append(MergeStep(f"{lead}{new}.{rest}", shape, _out(dt, out_dtype), "layer", ((i, own),),
                                       note=f"layer {layer} of #{i}"))
            if not found:
                problems.append(f"slice {list(item)}: #{i} {everything[i].name} has no layer {layer}")
            new += 1
    return steps
