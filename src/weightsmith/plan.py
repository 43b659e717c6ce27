"""`plan`: where every target parameter and buffer will get its value, before anything is written.

A `LoadPlan` is pure data. For each target key it names the source key(s), how they were
matched (exact, prefix, rule, structural, tied), the transforms on the way (concat, split,
transpose, cast, shape adapters), or why the key is missing and how it will be filled; and for
each source key left unused, why. `load_` executes a plan; nothing here touches the model.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._result import Result
from .adapt import find_adapter
from .errors import CheckpointError, CheckpointNotFoundError, WeightsmithError
from .keymap import Rule, align_prefixes, as_rules, expected_shape, natural_key, parse_transforms
from .selectors import compile_selector

__all__ = ["plan", "LoadPlan", "Step", "Unused", "Source", "as_source", "PlanError"]

_POLICIES = ("error", "skip", "adapt")


class PlanError(WeightsmithError):
    """A plan cannot be made or applied: every problem is listed in ``problems``."""

    def __init__(self, message: str, *, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)


@dataclass
class Step:
    """How one target key gets its value."""

    target: str
    kind: str                        # "parameter" or "buffer"
    shape: tuple[int, ...]
    dtype: str
    how: str                         # exact | prefix | rule | structural | tied | missing
    sources: tuple[str, ...] = ()
    transforms: tuple[str, ...] = ()  # rule transforms, "adapt:...", "cast a->b"
    index: int = 0                   # which piece of a one-to-many rule
    confidence: float = 1.0
    fill: str | None = None          # for missing keys: "init: ...", "current value", "reset_parameters"
    tied_to: str | None = None       # for tied keys: the key whose value they share
    note: str = ""

    @property
    def loaded(self) -> bool:
        return self.how not in ("missing", "tied")


@dataclass
class Unused:
    """A source key that no target takes, and why."""

    key: str
    shape: tuple[int, ...]
    reason: str
    expected: bool = False  # explained and harmless (e.g. a buffer the model computes itself)


@dataclass
class LoadPlan(Result):
    """Where each target key's value comes from; render it, check it, then `load_` it."""

    SCHEMA = "weightsmith.plan/1"
    source: str
    fingerprint: str
    target: str
    prefix: str
    steps: list[Step]
    unused: list[Unused] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def loaded(self) -> list[Step]:
        return [s for s in self.steps if s.loaded]

    @property
    def missing(self) -> list[Step]:
        return [s for s in self.steps if s.how == "missing"]

    @property
    def coverage(self) -> float:
        """Fraction of target parameter elements that come from the source."""
        total = sum(_numel(s.shape) for s in self.steps if s.kind == "parameter")
        got = sum(_numel(s.shape) for s in self.steps if s.kind == "parameter" and s.how != "missing")
        return got / total if total else 1.0

    def verdict(self) -> str:
        """One line: whether `load_` will take this plan, strictly or not."""
        if self.problems:
            return f"cannot load: {len(self.problems)} problem(s)"
        kept = [s for s in self.missing if (s.fill or "current value") == "current value"]
        unexpected = [u for u in self.unused if not u.expected]
        if kept or unexpected or self.ambiguous:
            parts = [f"{len(kept)} target key(s) without a value" if kept else "",
                     f"{len(unexpected)} unexplained source key(s)" if unexpected else "",
                     f"{len(self.ambiguous)} ambiguous match(es)" if self.ambiguous else ""]
            return ("a strict load refuses it (" + ", ".join(p for p in parts if p)
                    + "); strict=False loads the rest and keeps current values")
        filled = len(self.missing)
        return "ready to load" + (f"; {filled} target key(s) filled without the source" if filled else "")

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.steps:
            out[s.how] = out.get(s.how, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["counts"] = self.counts()
        d["coverage"] = self.coverage
        return d

    def _rich_(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        from .listing import fold_name

        table = Table(title=f"load plan: {self.source} -> {self.target}", title_justify="left")
        for col in ("target (# = any index)", "how", "source", "transforms / fill"):
            table.add_column(col, overflow="fold")
        rows: dict[tuple[str, ...], int] = {}
        order: list[tuple[str, ...]] = []
        for s in self.steps:
            src = ", ".join(fold_name(k) for k in s.sources)
            detail = ", ".join(s.transforms) if s.how != "missing" else (s.fill or "")
            if s.note:
                detail = f"{detail}; {s.note}" if detail else s.note
            if s.how == "structural":
                detail = f"{detail}; confidence {s.confidence:.2f}" if detail else f"confidence {s.confidence:.2f}"
            key = (fold_name(s.target), s.how, src, detail)
            if key not in rows:
                order.append(key)
            rows[key] = rows.get(key, 0) + 1
        for key in order:
            n = rows[key]
            table.add_row(key[0] + (f"  ×{n}" if n > 1 else ""), *key[1:])
        lines = [f"prefix: {self.prefix}",
                 "matched: " + ", ".join(f"{k} {v}" for k, v in self.counts().items())
                 + f"; coverage {self.coverage:.0%} of target parameters"]
        for u in self.unused:
            lines.append(f"unused source {u.key} {tuple(u.shape)}: {u.reason}")
        lines += [f"ambiguous: {a}" for a in self.ambiguous]
        lines += [f"problem: {p}" for p in self.problems]
        lines.append(self.verdict())
        return Group(table, Text("\n".join(lines)))


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# -- sources ---------------------------------------------------------------------------------
@dataclass
class Source:
    """What a plan needs of a source: names, shapes, dtypes, a fingerprint, and tensors on demand."""

    name: str
    fingerprint: str
    specs: dict[str, tuple[tuple[int, ...], str]]
    get: Callable[[str], Any]
    aliases: dict[str, str] = field(default_factory=dict)  # tied key -> key holding the data


def as_source(source: Any, *, root: str | None = None, trust: bool = False) -> Source:
    """A `Source` from a path, a `Checkpoint`, a state dict or a model."""
    from .checkpoint import Checkpoint, open as open_checkpoint

    if isinstance(source, (str, Path)):
        source = open_checkpoint(source, root=root, trust=trust)
    if isinstance(source, Checkpoint):
        specs = {k: (tuple(i.shape), i.dtype) for k, i in source.items()}
        try:
            stat = Path(source.path).stat()
        except OSError as e:  # moved or deleted since it was opened
            raise CheckpointNotFoundError(f"{source.path}: the checkpoint is gone since it was opened "
                                          f"({e.strerror or e}); open it again") from e
        fp = f"{Path(source.path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{source.root}"
        aliases = {k: g[0] for g in source.ties for k in g[1:]}
        return Source(str(source.path), _digest(fp, specs), specs, source.tensor, aliases)
    if hasattr(source, "state_dict") and callable(source.state_dict):
        state = source.state_dict()
        name = f"<{type(source).__name__}>"
    elif isinstance(source, Mapping):
        state, name = source, "<state dict>"
    else:
        raise WeightsmithError(f"cannot load from a {type(source).__name__}: give a path, a checkpoint, "
                               "a state dict or a model")
    try:  # one pass over the values: a mapping that reads lazily may fail here
        values = {k: v for k, v in state.items() if hasattr(v, "shape")}
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot read the {name}: {e}") from e
    specs = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in values.items()}
    return Source(name, _digest(name, specs, ids=[id(v) for v in values.values()]), specs, state.__getitem__)


def _digest(base: str, specs: Mapping[str, Any], ids: Sequence[int] = ()) -> str:
    h = hashlib.sha256(base.encode())
    for k, (shape, dtype) in specs.items():
        h.update(f"{k}:{shape}:{dtype};".encode())
    for i in ids:
        h.update(str(i).encode())
    return h.hexdigest()[:16]


# -- the plan ----------------------------------------------------------------------------------
def _targets(model: Any) -> tuple[dict[str, Any], dict[str, str], set[str], list[list[str]]]:
    """Target tensors by name, their kind, non-persistent buffer names, and tie groups.

    ``model`` is an ``nn.Module``, or a checkpoint / state dict standing for one (its tensors
    then count as parameters, and a checkpoint's ties as ties).
    """
    if not hasattr(model, "named_modules"):
        return _mapping_targets(model)
    state = model.state_dict(keep_vars=True)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    kinds = {k: "parameter" if k in params else "buffer" for k in state}
    persistent_free: set[str] = set()
    for mod_name, mod in model.named_modules():
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            persistent_free.add(f"{mod_name}.{b}" if mod_name else b)
    groups: dict[int, list[str]] = {}
    for k, v in state.items():
        groups.setdefault(id(v), []).append(k)
    return state, kinds, persistent_free, [g for g in groups.values() if len(g) > 1]


def _mapping_targets(target: Any) -> tuple[dict[str, Any], dict[str, str], set[str], list[list[str]]]:
    import torch

    from .io._dtypes import to_torch

    state: dict[str, Any] = {}
    for k in target.keys():
        v = target[k]
        if isinstance(v, torch.Tensor):
            state[k] = v
        else:  # a TensorInfo: shape and dtype only
            state[k] = torch.empty(v.shape, dtype=to_torch(v.dtype), device="meta")
    ties = [list(g) for g in getattr(target, "ties", [])]
    return state, {k: "parameter" for k in state}, set(), ties


def plan(model: Any, source: Any, *, rename: Any = (), match: str = "auto",
         on_mismatch: str | Sequence[tuple[Any, str]] = "error", init: Any = None,
         root: str | None = None, trust: bool = False) -> LoadPlan:
    """Plan how to load ``source`` into ``model``, without touching either.

    Args:
        model: the target ``nn.Module`` (parameters may be on the meta device).
        source: a path (anything `weightsmith.open` reads), a `Checkpoint`, a state dict, a model,
            or a `Source`.
        rename: rename rules, applied after prefixes are aligned: `Rule` objects,
            ``(source, target[, transform])`` tuples, a ``{source: target}`` mapping, or a
            ``.toml``/``.json`` rules file.
        match: ``"auto"`` also pairs the remaining tensors structurally (shape, order, names),
            reporting low-confidence or tied candidates as ambiguous; ``"exact"`` does not.
        on_mismatch: what a shape mismatch does: ``"error"``, ``"skip"`` (the target is filled
            without the source) or ``"adapt"`` (a named shape adapter); or a list of
            ``(selector, policy)`` pairs, first match wins, unmatched keys use ``"error"``.
        init: how missing target keys are filled: ``(selector, initializer)`` rules as for
            `init_` (or ``"default"``); keys no rule covers keep their current value.
        root, trust: passed to `weightsmith.open` when ``source`` is a path.

    Returns:
        a `LoadPlan`; its ``problems`` list says why it cannot be applied, if it cannot.
    """
    if match not in ("auto", "exact"):
        raise WeightsmithError(f"match must be 'auto' or 'exact', got {match!r}")
    src = source if isinstance(source, Source) else as_source(source, root=root, trust=trust)
    rules = as_rules(rename)
    policy = _policy(on_mismatch)
    state, kinds, non_persistent, tie_groups = _targets(model)
    tshape = {k: tuple(v.shape) for k, v in state.items()}
    tdtype = {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()}
    src_keys = [k for k in src.specs if k not in src.aliases]
    prefix = align_prefixes(src_keys, state)
    problems: list[str] = []
    unused: dict[str, Unused] = {}
    claims: dict[str, Step] = {}

    def claim(step: Step) -> None:
        prev = claims.get(step.target)
        if prev is not None:
            problems.append(f"target {step.target!r} is claimed by {', '.join(prev.sources)} and "
                            f"{', '.join(step.sources)}; add a rename rule to choose")
            return
        claims[step.target] = step

    # 1. names: prefixes, then rules (first match wins), else the name itself
    mapped = {prefix(k): k for k in src_keys}
    grouped: set[str] = set()
    for m, k in mapped.items():
        if k in grouped:
            continue
        for rule in rules:
            hit = _apply_rule(rule, m, mapped)
            if hit is None:
                continue
            for step in hit:
                claim(step)
                grouped.update(step.sources)
            break
        else:
            how = "exact" if m == k else "prefix"
            claim(Step(m, "", (), "", how, (k,)))

    # 2. shapes, dtypes and policies
    steps: dict[str, Step] = {}
    failed: set[str] = set()  # sources of claims that became problems: never re-paired
    failed_targets: set[str] = set()
    for t, step in claims.items():
        if t not in state:
            for k in step.sources:
                unused[k] = _no_target(k, t, src.specs[k][0], non_persistent)
            continue
        step.kind, step.shape, step.dtype = kinds[t], tshape[t], tdtype[t]
        shapes = [src.specs[k][0] for k in step.sources]
        try:
            got = expected_shape(shapes, parse_transforms(" | ".join(step.transforms)), index=step.index) \
                if step.transforms else shapes[0]
        except (RuntimeError, IndexError, ValueError, TypeError) as e:
            failed.update(step.sources)
            failed_targets.add(t)
            problems.append(f"{t}: transform {', '.join(step.transforms)} fails on source shapes {shapes}: {e}")
            continue
        if got != step.shape:
            what = policy(t)
            desc = f"{t}: source {', '.join(step.sources)} has shape {list(got)}, the target {list(step.shape)}"
            if what == "error":
                failed.update(step.sources)
                failed_targets.add(t)
                problems.append(desc + " (pass on_mismatch='skip' or 'adapt' for this key)")
                continue
            if what == "skip":
                for k in step.sources:
                    unused[k] = Unused(k, src.specs[k][0], f"shape {list(got)} does not fit {t!r} "
                                       f"{list(step.shape)} (skipped)")
                continue
            adapter = find_adapter(t, got, step.shape)
            if adapter is None:
                failed.update(step.sources)
                failed_targets.add(t)
                problems.append(desc + " and no shape adapter fits")
                continue
            step.transforms = (*step.transforms, str(adapter))
        sdtype = src.specs[step.sources[0]][1]
        if sdtype != step.dtype:
            step.transforms = (*step.transforms, f"cast {sdtype}->{step.dtype}")
        steps[t] = step

    # 3. structural matching of what is left
    ambiguous: list[str] = []
    used = {k for s in steps.values() for k in s.sources}
    if match == "auto":
        left_src = [k for k in src_keys if k not in used and k not in failed
                    and (k not in unused or unused[k].reason.startswith("no target"))]
        tied_names = {n for g in tie_groups for n in g[1:]}
        left_tgt = [t for t in state if t not in steps and t not in tied_names
                    and not any(t in g and any(m in steps for m in g) for g in tie_groups)]
        for t, k, conf, why in _structural(left_src, left_tgt, src.specs, tshape, tdtype, ambiguous):
            step = Step(t, kinds[t], tshape[t], tdtype[t], "structural", (k,), confidence=conf, note=why)
            if src.specs[k][1] != tdtype[t]:
                step.transforms = (f"cast {src.specs[k][1]}->{tdtype[t]}",)
            steps[t] = step
            unused.pop(k, None)
            used.add(k)

    # 4. ties, missing keys and unused sources
    shadowed: dict[str, Step] = {}  # a tied key the source also gave a value: load_ compares the two
    for group in tie_groups:
        loaded = [n for n in group if n in steps]
        for n in group:
            if n not in steps and loaded:
                steps[n] = Step(n, kinds[n], tshape[n], tdtype[n], "tied", tied_to=loaded[0],
                                note=f"tied to {loaded[0]}")
            elif n in steps and loaded and n != loaded[0]:
                s = shadowed[n] = steps.pop(n)
                for k in s.sources:
                    unused[k] = Unused(k, src.specs[k][0], f"{n!r} is tied to {loaded[0]!r}, loaded from "
                                       f"{', '.join(steps[loaded[0]].sources)}", expected=True)
                steps[n] = Step(n, kinds[n], tshape[n], tdtype[n], "tied", tied_to=loaded[0],
                                note=f"tied to {loaded[0]}")
    fill = _fill(model, init)
    ordered = []
    initializers: dict[str, Any] = {}
    for t in state:
        step = steps.get(t)
        if step is None and t in failed_targets:
            step = Step(t, kinds[t], tshape[t], tdtype[t], "missing", fill="not loaded: see problems")
        if step is None:
            how, initializers[t] = fill(t)
            if how == "current value" and state[t].is_meta and kinds[t] == "parameter":
                how = "reset_parameters"  # what build() does for a module constructed on meta
            step = Step(t, kinds[t], tshape[t], tdtype[t], "missing", fill=how)
        ordered.append(step)
    used = {k for s in ordered for k in s.sources}
    for k in src_keys:
        if k in used or k in unused or k in failed:
            continue
        unused[k] = _no_target(k, prefix(k), src.specs[k][0], non_persistent)
    for k, base in src.aliases.items():
        unused.setdefault(k, Unused(k, src.specs[k][0], f"tied to {base!r} in the source", expected=True))
    made = LoadPlan(
        source=src.name, fingerprint=src.fingerprint,
        target=type(model).__name__ if hasattr(model, "named_modules") else str(getattr(model, "path", "<state dict>")),
        prefix=prefix.describe(), steps=ordered,
        unused=sorted(unused.values(), key=lambda u: natural_key(u.key)),
        ambiguous=ambiguous, problems=problems)
    # the initializers themselves (callables have only a name in the plan's text)
    made._initializers = {t: how for t, how in initializers.items() if how is not None}
    made._shadowed = shadowed
    return made


def _no_target(key: str, name: str, shape: tuple[int, ...], non_persistent: set[str]) -> Unused:
    if name in non_persistent:
        return Unused(key, shape, "the target computes this buffer itself (non-persistent, not part of "
                      "its state dict)", expected=True)
    return Unused(key, shape, f"no target named {name!r}")


def _policy(on_mismatch: Any) -> Callable[[str], str]:
    if isinstance(on_mismatch, str):
        if on_mismatch not in _POLICIES:
            raise WeightsmithError(f"on_mismatch must be one of {_POLICIES}, got {on_mismatch!r}")
        return lambda _t: on_mismatch
    rules = [(compile_selector(sel), pol) for sel, pol in on_mismatch]
    for _, pol in rules:
        if pol not in _POLICIES:
            raise WeightsmithError(f"on_mismatch policy must be one of {_POLICIES}, got {pol!r}")
    return lambda t: next((pol for m, pol in rules if m(t)), "error")


def _apply_rule(rule: Rule, name: str, mapped: Mapping[str, str]) -> list[Step] | None:
    """Steps for ``name`` under ``rule`` (several for one-to-many), or ``None`` if it does not apply."""
    for j in range(len(rule.sources)):
        hit = rule.match(name, j)
        if hit is None:
            continue
        if rule.sources[j].startswith("re:"):
            new = rule.rename(name)
            transforms = tuple(str(t) for t in rule.transforms)
            return [Step(new, "", (), "", "rule", (mapped[name],), transforms, note=str(rule))] if new else None
        caps, suffix = hit
        names = rule.source_names(caps, suffix)
        missing = [n for n in names if n not in mapped]
        if missing:
            return None  # a fused rule needs every piece
        keys = tuple(mapped[n] for n in names)
        transforms = tuple(str(t) for t in rule.transforms)
        return [Step(t, "", (), "", "rule", keys, transforms, index=i, note=str(rule))
                for i, t in enumerate(rule.target_names(caps, suffix))]
    return None


def _fill(model: Any, init: Any) -> Callable[[str], tuple[str, Any]]:
    """For a missing target key: how it is filled, as text, and the initializer (``None``: kept)."""
    if init is None:
        return lambda _t: ("current value", None)
    if isinstance(init, str):
        return lambda _t: (f"init: {init}", init)
    rules = [(compile_selector(sel), how) for sel, how in init]
    owners = _owners(model) if hasattr(model, "named_modules") else {}

    def fill(t: str) -> tuple[str, Any]:
        for m, how in rules:
            if m(t, None, owners.get(t)):
                return f"init: {how if isinstance(how, str) else getattr(how, '__name__', 'custom')}", how
        return "current value", None

    return fill


def _owners(model: Any) -> dict[str, Any]:
    out = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for n, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            out[f"{mod_name}.{n}" if mod_name else n] = mod
    return out


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _kind(dtype: str) -> str:
    return "float" if dtype.startswith(("float", "bfloat", "complex")) else dtype


def _structural(src: list[str], tgt: list[str], specs: Mapping[str, tuple[tuple[int, ...], str]],
                tshape: Mapping[str, tuple[int, ...]], tdtype: Mapping[str, str],
                ambiguous: list[str]) -> list[tuple[str, str, float, str]]:
    """Pair leftover tensors by (leaf name, shape, dtype kind); equal counts pair in structural order."""
    by_sig_src: dict[tuple[Any, ...], list[str]] = {}
    by_sig_tgt: dict[tuple[Any, ...], list[str]] = {}
    for k in sorted(src, key=natural_key):
        by_sig_src.setdefault((_leaf(k), specs[k][0], _kind(specs[k][1])), []).append(k)
    for t in tgt:  # model order
        by_sig_tgt.setdefault((_leaf(t), tshape[t], _kind(tdtype[t])), []).append(t)
    pairs: list[tuple[str, str, float, str]] = []
    for sig, ts in by_sig_tgt.items():
        ss = by_sig_src.get(sig, [])
        if not ss:
            continue
        if len(ss) != len(ts):
            ambiguous.append(f"{len(ss)} source and {len(ts)} target tensors named *.{sig[0]} of shape "
                             f"{list(sig[1])}: not guessed ({', '.join(ss[:3])} / {', '.join(ts[:3])})")
            continue
        for k, t in zip(ss, ts):
            sim = difflib.SequenceMatcher(None, _parent(k), _parent(t)).ratio()
            if len(ss) == 1:
                conf, why = 0.8 + 0.2 * sim, f"the only *.{sig[0]} of shape {list(sig[1])} left on both sides"
            else:
                conf, why = 0.6 + 0.3 * sim, f"{len(ss)} *.{sig[0]} of shape {list(sig[1])}, paired in order"
            pairs.append((t, k, round(conf, 2), why))
    # a source module must map to one target module: drop pairings that split one
    parent_map: dict[str, set[str]] = {}
    for t, k, _, _ in pairs:
        parent_map.setdefault(_parent(k), set()).add(_parent(t))
    split = {p for p, ts in parent_map.items() if len(ts) > 1}
    kept = []
    for t, k, conf, why in pairs:
        if _parent(k) in split:
            ambiguous.append(f"{k} -> {t}: its module's tensors would go to different target modules; not guessed")
        elif conf < 0.6:
            ambiguous.append(f"{k} -> {t}: confidence {conf:.2f} too low; not guessed")
        else:
            kept.append((t, k, conf, why))
    return kept
