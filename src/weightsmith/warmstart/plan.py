"""`plan`: where every target parameter and buffer will get its value, before anything is written.

A `LoadPlan` is pure data. For each target key it names the source key(s), how they were
matched (exact, prefix, rule, structural, tied), the transforms on the way (concat, split,
transpose, cast, shape adapters), or why the key is missing and how it will be filled; and for
each source key left unused, why. `load_` executes a plan; nothing here touches the model.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .._result import Result, to_plain
from .adapt import find_adapter
from ..errors import CheckpointError, CheckpointNotFoundError, UsageError
from .keymap import PrefixMap, Rule, align_prefixes, as_rules, natural_key
from .transforms import Adapter, Cast, Op, Transform, expected_shape
from ..selectors import compile_selector

__all__ = ["plan", "make", "PlanOptions", "LoadPlan", "Step", "Unused", "Source", "as_source", "format_share"]

_POLICIES = ("error", "skip", "adapt")


@dataclass
class Step:
    """How one target key gets its value."""

    target: str
    kind: str                        # "parameter" or "buffer"
    shape: tuple[int, ...]
    dtype: str
    how: str                         # exact | prefix | rule | structural | tied | missing | skipped
    sources: tuple[str, ...] = ()
    ops: tuple[Op, ...] = ()         # rule transforms, then a shape adapter, then a cast
    index: int = 0                   # which piece of a one-to-many rule
    confidence: float = 1.0
    fill: str | None = None          # missing / skipped keys: "init: ...", "current value", "reset_parameters",
                                     # "_init_weights" (a transformers model's own initialization)
    tied_to: str | None = None       # for tied keys: the key whose value they share
    note: str = ""

    @property
    def loaded(self) -> bool:
        return self.how not in ("missing", "tied", "skipped")

    @property
    def transforms(self) -> tuple[str, ...]:
        """The ops as text: ``"cat(0)"``, ``"adapt:rows (...)"``, ``"cast float32->bfloat16"``."""
        return tuple(str(o) for o in self.ops)

    @property
    def adapted(self) -> bool:
        """Whether a shape adapter makes the value (it may read the target's current value)."""
        return any(isinstance(o, Adapter) for o in self.ops)

    @property
    def cast_only(self) -> bool:
        """Whether the value is one source tensor as it is, at most cast to the target's dtype."""
        return len(self.sources) == 1 and all(isinstance(o, Cast) for o in self.ops)

    def to_dict(self) -> dict[str, Any]:
        """The plan's serialized form: ops as text, in the place of the ``transforms`` field."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "ops":
                out["transforms"] = list(self.transforms)
            else:
                out[f.name] = to_plain(getattr(self, f.name))
        return out


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
    warnings: list[str] = field(default_factory=list)
    # for the load, not the plan's data (not serialized): the initializers themselves (a callable
    # has only a name in the text), and tied keys the source gives a second value (load_ compares)
    initializers: dict[str, Any] = field(default_factory=dict, repr=False, compare=False,
                                         metadata={"internal": True})
    shadowed: dict[str, Step] = field(default_factory=dict, repr=False, compare=False,
                                      metadata={"internal": True})

    @property
    def loaded(self) -> list[Step]:
        return [s for s in self.steps if s.loaded]

    @property
    def missing(self) -> list[Step]:
        """Target keys the source has no value for (skipped keys are not missing: they were asked for)."""
        return [s for s in self.steps if s.how == "missing"]

    @property
    def skipped(self) -> list[Step]:
        """Target keys whose source value did not fit and that ``on_mismatch="skip"`` leaves out."""
        return [s for s in self.steps if s.how == "skipped"]

    @property
    def unsourced(self) -> list[Step]:
        """Target keys filled without the source: missing and skipped ones."""
        return [s for s in self.steps if s.how in ("missing", "skipped")]

    @property
    def coverage(self) -> float:
        """Fraction of target parameter elements that come from the source."""
        total = sum(_numel(s.shape) for s in self.steps if s.kind == "parameter")
        got = sum(_numel(s.shape) for s in self.steps
                  if s.kind == "parameter" and s.how not in ("missing", "skipped"))
        return got / total if total else 1.0

    def judge(self, *, strict: bool = True, min_coverage: float = 0.5) -> LoadPlan:
        """Render and serialize the verdict for these `load_` options (the defaults otherwise)."""
        self._judged = {"strict": strict, "min_coverage": min_coverage}
        return self

    def refusals(self, *, strict: bool = True, min_coverage: float = 0.5) -> list[str]:
        """Why `load_` (with these options) refuses this plan; empty when it loads it."""
        problems = list(self.problems)
        if strict:
            unused = [u for u in self.unused if not u.expected]
            for s in self.missing:
                if (s.fill or "current value") != "current value":
                    continue
                near = difflib.get_close_matches(s.target, [u.key for u in unused], n=1, cutoff=0.5)
                hint = ""
                if near:
                    u = next(u for u in unused if u.key == near[0])
                    hint = f"; the closest unused source key is {u.key} {list(u.shape)}"
                problems.append(f"missing: {s.target} {list(s.shape)} has no value in the source{hint} (pass "
                                "init= rules for it, or strict=False to keep its current value)")
            problems += [f"unexpected: source {u.key} {list(u.shape)}: {u.reason}" for u in unused]
            problems += [f"ambiguous: {a}" for a in self.ambiguous]
        if not self.loaded:
            problems.append(f"nothing in {self.source} matches {self.target}: refusing a load that loads nothing")
        elif self.coverage < min_coverage:
            problems.append(f"only {format_share(self.coverage)} of {self.target}'s parameters come from "
                            f"{self.source} (min_coverage={format_share(min_coverage)})")
        return problems

    def verdict(self, *, strict: bool = True, min_coverage: float = 0.5) -> str:
        """One line: whether `load_` with these options takes this plan, and what it does."""
        refused = self.refusals(strict=strict, min_coverage=min_coverage)
        mode = "a strict load" if strict else "a load with strict=False"
        if refused:
            kinds: dict[str, int] = {}
            for r in refused:
                word = r.split(":", 1)[0] if r.split(":", 1)[0] in ("missing", "unexpected", "ambiguous") else "problem"
                kinds[word] = kinds.get(word, 0) + 1
            text = f"{mode} refuses it (" + ", ".join(f"{n} {k}" for k, n in kinds.items()) + "); nothing is changed"
            if strict and not self.refusals(strict=False, min_coverage=min_coverage):
                text += "; strict=False loads the rest and keeps current values"
            return text
        filled = len(self.unsourced)
        return f"ready: {mode} takes it" + (f"; {filled} target key(s) filled without the source" if filled else "")

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.steps:
            out[s.how] = out.get(s.how, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["counts"] = self.counts()
        d["coverage"] = self.coverage
        d["verdict"] = self.verdict(**getattr(self, "_judged", {}))
        d["refusals"] = self.refusals(**getattr(self, "_judged", {}))
        return d

    def _rich_(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        from ..listing import fold_name

        table = Table(title=f"load plan: {self.source} -> {self.target}", title_justify="left")
        for col in ("target (# = any index)", "how", "source", "transforms / fill"):
            table.add_column(col, overflow="fold")
        rows: dict[tuple[str, ...], int] = {}
        order: list[tuple[str, ...]] = []
        for s in self.steps:
            src = ", ".join(fold_name(k) for k in s.sources)
            detail = ", ".join(s.transforms) if s.how not in ("missing", "skipped") else (s.fill or "")
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
                 + f"; coverage {format_share(self.coverage)} of target parameters"]
        for u in self.unused:
            lines.append(f"unused source {u.key} {tuple(u.shape)}: {u.reason}")
        lines += [f"ambiguous: {a}" for a in self.ambiguous]
        lines += [f"problem: {p}" for p in self.problems]
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append(self.verdict(**getattr(self, "_judged", {})))
        return Group(table, Text("\n".join(lines)))


def format_share(x: float) -> str:
    """A fraction as a percentage that never reads 100% (or 0%) when it is not: 0.9999 -> "99.99%"."""
    if x >= 1.0:
        return "100%"
    if x <= 0.0:
        return "0%"
    pct = x * 100
    for digits in range(0, 10):  # the fewest digits that neither round up to 100 nor down to 0
        if 0 < round(pct, digits) < 100:
            if digits == 0:
                return f"{round(pct)}%"
            scale = 10 ** digits  # cut toward the middle: 99.996 reads 99.99, not 100.00
            v = math.floor(pct * scale) / scale if pct > 50 else math.ceil(pct * scale) / scale
            return f"{v:.{digits}f}%"
    return f"{pct}%"


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
    ordered: bool = True  # whether ``specs`` is in module order (a safetensors file sorts its names)
    shared: dict[str, str] = field(default_factory=dict)  # a state dict's tied keys -> first name (structural only)


def as_source(source: Any, *, root: str | None = None, trust: bool = False) -> Source:
    """A `Source` from a path, a `Checkpoint`, a state dict or a model."""
    from ..checkpoint import Checkpoint, open as open_checkpoint

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
        return Source(str(source.path), _digest(fp, specs), specs, source.tensor, aliases,
                      ordered=_in_module_order(source, specs))
    if hasattr(source, "state_dict") and callable(source.state_dict):
        state = source.state_dict()
        name = f"<{type(source).__name__}>"
    elif isinstance(source, Mapping):
        state, name = source, "<state dict>"
    else:
        raise UsageError(f"cannot load from a {type(source).__name__}: give a path, a checkpoint, "
                         "a state dict or a model")
    try:  # one pass over the values: a mapping that reads lazily may fail here
        values = {k: v for k, v in state.items() if hasattr(v, "shape")}
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot read the {name}: {e}") from e
    specs = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in values.items()}
    return Source(name, _digest(name, specs, ids=[id(v) for v in values.values()]), specs, state.__getitem__,
                  shared=_shared(values))


def _shared(values: Mapping[str, Any]) -> dict[str, str]:
    """Tied keys of a state dict (one tensor under several names) -> the first name holding it."""
    first: dict[tuple[Any, ...], str] = {}
    out: dict[str, str] = {}
    for k, v in values.items():
        try:
            if v.device.type == "meta" or v.numel() == 0:
                continue
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        except (AttributeError, RuntimeError, TypeError):  # not a plain tensor: no ties to find
            continue
        if key in first:
            out[k] = first[key]
        else:
            first[key] = k
    return out


def _in_module_order(ckpt: Any, specs: Mapping[str, tuple[tuple[int, ...], str]]) -> bool:
    """Whether a checkpoint lists its tensors in module order.

    A torch file keeps the order of the state dict it pickled; weightsmith's safetensors writer
    keeps the order it was given. The safetensors library sorts by name (within each dtype), so a
    file in that order, whoever wrote it, is taken as sorted, not as module order.
    """
    if ckpt.format in ("torch", "torch-legacy"):
        return True
    if ckpt.format != "safetensors" or "weightsmith.crc32" not in ckpt.metadata:
        return False
    by_dtype: dict[str, list[str]] = {}
    for k, (_, dtype) in specs.items():
        by_dtype.setdefault(dtype, []).append(k)
    return any(keys != sorted(keys) for keys in by_dtype.values())


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

    from ..io._dtypes import to_torch

    state: dict[str, Any] = {}
    for k in target.keys():
        v = target[k]
        if isinstance(v, torch.Tensor):
            state[k] = v
        else:  # a TensorInfo: shape and dtype only
            state[k] = torch.empty(v.shape, dtype=to_torch(v.dtype), device="meta")
    ties = [list(g) for g in getattr(target, "ties", [])]
    return state, {k: "parameter" for k in state}, set(), ties


def plan(model: Any, source: Any, *, rename: Any = (), match: str = "exact",
         on_mismatch: str | Sequence[tuple[Any, str]] = "error", init: Any = None,
         allow_unused_rules: bool = False, root: str | None = None, trust: bool = False) -> LoadPlan:
    """Plan how to load ``source`` into ``model``, without touching either.

    Args:
        model: the target ``nn.Module`` (parameters may be on the meta device).
        source: a path (anything `weightsmith.open` reads), a `Checkpoint`, a state dict, a model,
            or a `Source`.
        rename: rename rules, applied after prefixes are aligned: `Rule` objects,
            ``(source, target[, transform])`` tuples, a ``{source: target}`` mapping, or a
            ``.toml``/``.json`` rules file. A rule that matches no source key is a problem.
        match: ``"exact"`` (default) pairs by names: exact, wrapper prefixes, rules. ``"auto"``
            then pairs the remaining modules structurally (`warmstart.match`): module
            signatures aligned in order, never across subtrees; what it cannot decide is
            reported as ambiguous.
        on_mismatch: what a shape mismatch does: ``"error"``, ``"skip"`` (the target keeps its
            value or gets ``init``, and is listed as skipped) or ``"adapt"`` (a named shape
            adapter); or a list of ``(selector, policy)`` pairs, first match wins, unmatched keys
            use ``"error"``.
        init: how missing (and skipped) target keys are filled: ``(selector, initializer)`` rules
            as for `init_` (or ``"default"``); keys no rule covers keep their current value.
        allow_unused_rules: a rename rule that matches nothing is a warning, not a problem.
        root, trust: passed to `weightsmith.open` when ``source`` is a path.

    Returns:
        a `LoadPlan`; its ``problems`` list says why it cannot be applied, if it cannot.
    """
    return make(model, source, PlanOptions(rename=rename, match=match, on_mismatch=on_mismatch, init=init,
                                           allow_unused_rules=allow_unused_rules, root=root, trust=trust))


@dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """The choices a plan is made with: the keyword arguments of `plan` (and of `load_`, `build`...)."""

    rename: Any = ()
    match: str = "exact"
    on_mismatch: str | Sequence[tuple[Any, str]] = "error"
    init: Any = None
    allow_unused_rules: bool = False
    root: str | None = None
    trust: bool = False

    @classmethod
    def of(cls, options: Mapping[str, Any], **more: Any) -> PlanOptions:
        """Options from keyword arguments passed through a front door; an unknown name is refused."""
        given = {**options, **more}
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise UsageError(f"unknown plan option(s) {', '.join(unknown)}; the options are {', '.join(known)}")
        return cls(**given)


class _Targets:
    """The target's tensors by name, with their kind, shape and dtype, and its ties."""

    def __init__(self, state: dict[str, Any], kinds: dict[str, str], non_persistent: set[str],
                 tie_groups: list[list[str]]) -> None:
        self.state, self.kinds, self.non_persistent, self.tie_groups = state, kinds, non_persistent, tie_groups
        self.shape = {k: tuple(v.shape) for k, v in state.items()}
        self.dtype = {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()}


class _Draft:
    """A plan being made: what each phase decided so far."""

    def __init__(self) -> None:
        self.claims: dict[str, Step] = {}      # target -> step, by names (phase 1)
        self.steps: dict[str, Step] = {}       # target -> step that fits (phases 2-4)
        self.unused: dict[str, Unused] = {}
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.ambiguous: list[str] = []
        self.failed: set[str] = set()          # sources of claims that became problems: never re-paired
        self.failed_targets: set[str] = set()
        self.shadowed: dict[str, Step] = {}    # a tied key the source also gave a value

    def claim(self, step: Step) -> None:
        prev = self.claims.get(step.target)
        if prev is not None:
            self.problems.append(f"target {step.target!r} is claimed by {', '.join(prev.sources)} and "
                                 f"{', '.join(step.sources)}; add a rename rule to choose")
            return
        self.claims[step.target] = step

    def fail(self, step: Step, problem: str) -> None:
        self.failed.update(step.sources)
        self.failed_targets.add(step.target)
        self.problems.append(problem)


def make(model: Any, source: Any, options: PlanOptions) -> LoadPlan:
    """`plan` with its options in one object; the phases run in order, each on the draft so far."""
    if options.match not in ("auto", "exact"):
        raise UsageError(f"match must be 'exact' (names only) or 'auto' (also structural), got {options.match!r}")
    src = source if isinstance(source, Source) else as_source(source, root=options.root, trust=options.trust)
    rules = as_rules(options.rename)
    policy = _policy(options.on_mismatch)
    targets = _Targets(*_targets(model))
    src_keys = [k for k in src.specs if k not in src.aliases]
    prefix = align_prefixes(src_keys, targets.state)
    draft = _Draft()
    _pair_by_name(draft, src_keys, prefix, rules, allow_unused_rules=options.allow_unused_rules)
    _fit(draft, src, targets, policy)
    if options.match == "auto":
        _structural(model, src, targets, draft)
    _settle_tie_groups(draft, src, targets)
    ordered, initializers = _complete(draft, model, targets, options.init)
    _explain_unused(draft, src, src_keys, ordered, prefix, targets.non_persistent)
    made = LoadPlan(
        source=src.name, fingerprint=src.fingerprint,
        target=type(model).__name__ if hasattr(model, "named_modules") else str(getattr(model, "path", "<state dict>")),
        prefix=prefix.describe(), steps=ordered,
        unused=sorted(draft.unused.values(), key=lambda u: natural_key(u.key)),
        ambiguous=draft.ambiguous, problems=draft.problems, warnings=draft.warnings,
        initializers={t: how for t, how in initializers.items() if how is not None}, shadowed=draft.shadowed)
    return made


def _pair_by_name(draft: _Draft, src_keys: Sequence[str], prefix: PrefixMap, rules: Sequence[Rule], *,
                  allow_unused_rules: bool) -> None:
    """Phase 1, names: wrapper prefixes aligned, then rename rules (first match wins), else the name itself."""
    mapped = {prefix(k): k for k in src_keys}
    grouped: set[str] = set()
    hits: dict[int, int] = {}
    for m, k in mapped.items():
        if k in grouped:
            continue
        for i, rule in enumerate(rules):
            hit = _apply_rule(rule, m, mapped)
            if hit is None:
                continue
            hits[i] = hits.get(i, 0) + 1
            for step in hit:
                draft.claim(step)
                grouped.update(step.sources)
            break
        else:
            how = "exact" if m == k else "prefix"
            draft.claim(Step(m, "", (), "", how, (k,)))
    for i, rule in enumerate(rules):
        if i not in hits:
            text = _unused_rule(rule, i, list(mapped))
            (draft.warnings if allow_unused_rules else draft.problems).append(
                text + ("" if allow_unused_rules else "; remove it, or pass allow_unused_rules=True"))


def _fit(draft: _Draft, src: Source, targets: _Targets, policy: Callable[[str], str]) -> None:
    """Phase 2, shapes and dtypes: each claim's value must fit its target, else the policy decides."""
    for t, step in draft.claims.items():
        if t not in targets.state:
            for k in step.sources:
                draft.unused[k] = _no_target(k, t, src.specs[k][0], targets.non_persistent)
            continue
        step.kind, step.shape, step.dtype = targets.kinds[t], targets.shape[t], targets.dtype[t]
        shapes = [src.specs[k][0] for k in step.sources]
        try:
            rule_ops = [o for o in step.ops if isinstance(o, Transform)]
            got = expected_shape(shapes, rule_ops, index=step.index) if rule_ops else shapes[0]
        except (RuntimeError, IndexError, ValueError, TypeError) as e:
            draft.fail(step, f"{t}: transform {', '.join(step.transforms)} fails on source shapes {shapes}: {e}")
            continue
        if got != step.shape:
            what = policy(t)
            desc = f"{t}: source {', '.join(step.sources)} has shape {list(got)}, the target {list(step.shape)}"
            if what == "error":
                draft.fail(step, desc + " (pass on_mismatch='skip' or 'adapt' for this key)")
                continue
            if what == "skip":
                for k in step.sources:
                    draft.unused[k] = Unused(k, src.specs[k][0], f"skipped: shape {list(got)} does not fit {t!r} "
                                             f"{list(step.shape)} (on_mismatch='skip')", expected=True)
                step.how = "skipped"
                step.note = f"source {', '.join(step.sources)} {list(got)} does not fit {list(step.shape)}"
                draft.steps[t] = step
                continue
            adapter = find_adapter(t, got, step.shape)
            if adapter is None:
                draft.fail(step, desc + " and no shape adapter fits")
                continue
            step.ops = (*step.ops, adapter)
        sdtype = src.specs[step.sources[0]][1]
        if sdtype != step.dtype:
            step.ops = (*step.ops, Cast(sdtype, step.dtype))
        draft.steps[t] = step


def _settle_tie_groups(draft: _Draft, src: Source, targets: _Targets) -> None:
    """Phase 4, ties: a tied target takes its group's loaded value; a second value from the source is
    kept aside (``shadowed``) for `load_` to compare."""
    steps, kinds, tshape, tdtype = draft.steps, targets.kinds, targets.shape, targets.dtype
    for group in targets.tie_groups:
        loaded = [n for n in group if n in steps and steps[n].loaded]
        for n in group:
            if n not in steps and loaded:
                steps[n] = Step(n, kinds[n], tshape[n], tdtype[n], "tied", tied_to=loaded[0],
                                note=f"tied to {loaded[0]}")
            elif n in steps and loaded and n != loaded[0]:
                s = draft.shadowed[n] = steps.pop(n)
                for k in s.sources:
                    draft.unused[k] = Unused(k, src.specs[k][0], f"{n!r} is tied to {loaded[0]!r}, loaded from "
                                             f"{', '.join(steps[loaded[0]].sources)}", expected=True)
                steps[n] = Step(n, kinds[n], tshape[n], tdtype[n], "tied", tied_to=loaded[0],
                                note=f"tied to {loaded[0]}")


def _complete(draft: _Draft, model: Any, targets: _Targets, init: Any) -> tuple[list[Step], dict[str, Any]]:
    """Phase 5, missing keys: every target gets a step, in the model's order, with how it is filled."""
    fill = _fill(model, init)
    own_init = "_init_weights" if callable(getattr(model, "_init_weights", None)) else "reset_parameters"
    ordered = []
    initializers: dict[str, Any] = {}
    for t in targets.state:
        step = draft.steps.get(t)
        if step is None and t in draft.failed_targets:
            step = Step(t, targets.kinds[t], targets.shape[t], targets.dtype[t], "missing",
                        fill="not loaded: see problems")
        if step is None or step.how == "skipped":
            how, initializers[t] = fill(t)
            if how == "current value" and targets.state[t].is_meta and targets.kinds[t] == "parameter":
                how = own_init  # what build() does for a module constructed on meta
            if step is None:
                step = Step(t, targets.kinds[t], targets.shape[t], targets.dtype[t], "missing", fill=how)
            else:
                step.fill = how
        ordered.append(step)
    return ordered, initializers


def _explain_unused(draft: _Draft, src: Source, src_keys: Sequence[str], ordered: Sequence[Step],
                    prefix: PrefixMap, non_persistent: set[str]) -> None:
    """Phase 6, unused sources: each source key no step takes gets its reason."""
    unused = draft.unused
    used = {k for s in ordered if s.loaded for k in s.sources}
    for k in src_keys:
        if k in used or k in unused or k in draft.failed:
            continue
        twin = next((n for n in sorted(_tied_names(k, src.shared)) if n in used), None)
        if twin is not None:
            unused[k] = Unused(k, src.specs[k][0], f"the same tensor as {twin!r} in the source, which is loaded",
                               expected=True)
            continue
        unused[k] = _no_target(k, prefix(k), src.specs[k][0], non_persistent)
    for k, base in src.aliases.items():
        unused.setdefault(k, Unused(k, src.specs[k][0], f"tied to {base!r} in the source", expected=True))


def _structural(model: Any, src: Source, targets: _Targets, draft: _Draft) -> None:
    """Phase 3 (``match="auto"``): pair what names left unpaired by module structure (`match_modules`)."""
    from .match import match_modules

    steps, unused, failed, tie_groups = draft.steps, draft.unused, draft.failed, targets.tie_groups
    kinds, tshape, tdtype, state = targets.kinds, targets.shape, targets.dtype, targets.state
    used = {k for s in steps.values() for k in s.sources}
    # one tensor under several names (T5's shared embedding, also its encoder's) pairs once, under
    # its deepest name: that one says where in the tree it is used
    rep: dict[str, str] = {}
    for k, base in src.shared.items():
        best = rep.get(base, base)
        rep[base] = k if k.count(".") > best.count(".") else best
    hidden = {k for k, base in src.shared.items() if rep[base] != k} | {b for b, k in rep.items() if k != b}
    left_src = [k for k in src.specs if k not in src.aliases and k not in used and k not in failed
                and k not in hidden and not any(n in used for n in _tied_names(k, src.shared))
                and (k not in unused or unused[k].reason.startswith("no target"))]
    tied_names = {n for g in tie_groups for n in g[1:]}
    left_tgt = [t for t in state if t not in steps and t not in tied_names
                and not any(t in g and any(m in steps for m in g) for g in tie_groups)]
    anchors = {k: s.target for s in steps.values() if s.loaded for k in s.sources}
    linear: set[str] = set()
    if hasattr(model, "named_modules"):
        from torch import nn

        linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    found = match_modules({k: src.specs[k] for k in left_src}, {t: (tshape[t], tdtype[t]) for t in left_tgt},
                          anchors=anchors, source_ordered=src.ordered, linear=linear)
    for pair in found.pairs:
        t, k = pair.target, pair.source
        ops: tuple[Op, ...] = (pair.transform,) if pair.transform is not None else ()
        if src.specs[k][1] != tdtype[t]:
            ops += (Cast(src.specs[k][1], tdtype[t]),)
        steps[t] = Step(t, kinds[t], tshape[t], tdtype[t], "structural", (k,), ops,
                        confidence=pair.confidence, note=pair.reason)
        unused.pop(k, None)
    draft.ambiguous += [str(a) for a in found.ambiguous]


def _tied_names(key: str, shared: Mapping[str, str]) -> set[str]:
    base = shared.get(key, key)
    return ({k for k, b in shared.items() if b == base} | {base}) - {key}


def _unused_rule(rule: Rule, index: int, names: Sequence[str]) -> str:
    """Text for a rename rule that matched no source key, with the closest source modules."""
    modules = sorted({n.rpartition(".")[0] for n in names} | set(names))
    pattern = rule.sources[0].removeprefix("re:")
    near = difflib.get_close_matches(pattern, modules, n=3, cutoff=0.4)
    return (f"rename rule {index + 1} ({rule}) matches no source key"
            + (f"; closest source names: {', '.join(near)}" if near else ""))


def _no_target(key: str, name: str, shape: tuple[int, ...], non_persistent: set[str]) -> Unused:
    if name in non_persistent:
        return Unused(key, shape, "the target computes this buffer itself (non-persistent, not part of "
                      "its state dict)", expected=True)
    return Unused(key, shape, f"no target named {name!r}")


def _policy(on_mismatch: Any) -> Callable[[str], str]:
    if isinstance(on_mismatch, str):
        if on_mismatch not in _POLICIES:
            raise UsageError(f"on_mismatch must be one of {_POLICIES}, got {on_mismatch!r}")
        return lambda _t: on_mismatch
    rules = [(compile_selector(sel), pol) for sel, pol in on_mismatch]
    for _, pol in rules:
        if pol not in _POLICIES:
            raise UsageError(f"on_mismatch policy must be one of {_POLICIES}, got {pol!r}")
    return lambda t: next((pol for m, pol in rules if m(t)), "error")


def _apply_rule(rule: Rule, name: str, mapped: Mapping[str, str]) -> list[Step] | None:
    """Steps for ``name`` under ``rule`` (several for one-to-many), or ``None`` if it does not apply."""
    for j in range(len(rule.sources)):
        hit = rule.match(name, j)
        if hit is None:
            continue
        if rule.sources[j].startswith("re:"):
            new = rule.rename(name)
            return [Step(new, "", (), "", "rule", (mapped[name],), rule.transforms, note=str(rule))] if new else None
        caps, suffix = hit
        names = rule.source_names(caps, suffix)
        missing = [n for n in names if n not in mapped]
        if missing:
            return None  # a fused rule needs every piece
        keys = tuple(mapped[n] for n in names)
        return [Step(t, "", (), "", "rule", keys, rule.transforms, index=i, note=str(rule))
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
