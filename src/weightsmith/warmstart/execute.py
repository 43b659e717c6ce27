"""Execute a `LoadPlan`: check, stage, commit — all or nothing, with a report of each value's origin.

`checked` resolves and checks a plan against the model (refusals, meta targets, targets that
cannot be written in place, tied keys given two values); `stage` reads and transforms every
value before anything is written; `load_into` commits them through the model's own
``load_state_dict``. The front doors in `load` and the sharded load call these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from .._result import Result
from ..errors import AssignError, ModelError, PlanError, UsageError, WeightsmithError
from .plan import LoadPlan, PlanOptions, Source, Step, as_source, format_share, make
from .transforms import apply_ops

__all__ = ["LoadReport", "checked", "check_plan", "resolve", "value_of", "stage", "settle_ties", "tie_picks",
           "unaliased", "fill_missing", "in_place_from_dcp", "commit", "writing_may_fail", "written_keys",
           "report_of"]

@dataclass
class LoadReport(Result):
    """What a load did: each target key's provenance, and what the source had that was not used."""

    SCHEMA = "weightsmith.load/1"
    source: str
    target: str
    loaded: int
    filled: int
    coverage: float
    provenance: dict[str, str]
    unused: dict[str, str] = field(default_factory=dict)

    def _rich_(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        from ..listing import fold_name

        table = Table(title=f"loaded {self.source} -> {self.target}", title_justify="left")
        table.add_column("target (# = any index)")
        table.add_column("value from")
        counts: dict[tuple[str, str], int] = {}
        for t, how in self.provenance.items():
            key = (fold_name(t), _fold_text(how))
            counts[key] = counts.get(key, 0) + 1
        for (t, how), n in counts.items():
            table.add_row(t + (f"  ×{n}" if n > 1 else ""), how)
        lines = [f"{self.loaded} loaded from the source, {self.filled} filled otherwise; "
                 f"coverage {format_share(self.coverage)} of target parameters"]
        lines += [f"unused {k}: {why}" for k, why in self.unused.items()]
        return Group(table, Text("\n".join(lines)))


def _fold_text(text: str) -> str:
    from ..listing import fold_name

    return " + ".join(fold_name(p) if i == 0 else p for i, p in enumerate(text.split(" + ", 1)))


def _provenance(step: Step) -> str:
    if step.how in ("missing", "skipped"):
        return (step.fill or "current value") + (f" (skipped: {step.note})" if step.how == "skipped" else "")
    if step.how == "tied":
        return step.note
    text = ", ".join(step.sources)
    return text + (" + " + ", ".join(step.transforms) if step.transforms else "")


def check_plan(p: LoadPlan, *, strict: bool, min_coverage: float) -> None:
    problems = p.refusals(strict=strict, min_coverage=min_coverage)  # the plan's verdict says the same
    if problems:
        head = f"cannot load {p.source} into {p.target}; nothing was changed ({len(problems)} problem(s)):"
        raise PlanError("\n  - ".join([head, *problems[:50]]) + ("\n  ..." if len(problems) > 50 else ""),
                        problems=problems)


def resolve(model: Any, source: Any, plan: LoadPlan | None, options: dict[str, Any]) -> tuple[LoadPlan, Source]:
    if plan is not None:
        if options:
            raise PlanError(f"pass either plan= or plan options ({', '.join(options)}), not both")
        src = as_source(source)
        if src.fingerprint != plan.fingerprint:
            raise PlanError(f"the plan was made for another source ({plan.source}, fingerprint "
                            f"{plan.fingerprint}), not {src.name} ({src.fingerprint}); make a new plan")
        return plan, src
    opts = PlanOptions.of(options)
    src = as_source(source, root=opts.root, trust=opts.trust)
    return make(model, src, opts), src


def value_of(step: Step, src: Source, current: Any) -> Any:
    """The value a loaded step writes: its source tensor(s) through the step's ops."""
    return apply_ops([src.get(k) for k in step.sources], step.ops, index=step.index, current=current)


def stage(p: LoadPlan, src: Source, state: Mapping[str, Any]) -> dict[str, Any]:
    """Read and transform every value before anything is written; an error here changes nothing."""
    staged = {}
    for step in p.loaded:
        try:
            staged[step.target] = value_of(step, src, state[step.target])
        except (OSError, RuntimeError, ValueError) as e:
            raise PlanError(f"cannot read {', '.join(step.sources)} from {src.name} for {step.target}: {e}; "
                            "nothing was changed") from e
    return staged


def settle_ties(p: LoadPlan, src: Source, state: Mapping[str, Any], *, tied: str | Sequence[str]) -> LoadPlan:
    """Check the tied targets the source gives a value more than once; the plan with the winners.

    A tie is one tensor under several names: when the source has a value for more than one of
    them, the plan loads the first name's and drops the rest. Equal values (after the cast to
    the target's dtype) load as planned. Different values are refused, naming both keys and
    the largest difference, unless ``tied`` is ``"first"`` (the first name in the model's
    order wins) or names the key (target or source) whose value wins; the plan returned then
    takes that key's value. Values are read for the comparison only where such keys exist.
    """
    shadowed = p.shadowed
    picks = tie_picks(tied)
    if not shadowed:
        return p
    steps = {s.target: s for s in p.steps}
    groups: dict[str, list[Step]] = {}
    for name, shadow in shadowed.items():
        kept = steps[name].tied_to or name
        groups.setdefault(kept, [steps[kept]]).append(shadow)
    overrides: dict[str, Step] = {}
    problems: list[str] = []
    for kept, members in groups.items():
        current = state[kept]
        first = _read(members[0], src, current)
        differ = [(m, d) for m in members[1:] if (d := _difference(first, _read(m, src, current), current.dtype))]
        if not differ or "first" in picks:
            continue
        chosen = [m for m in members if m.target in picks or picks & set(m.sources)]
        if len(chosen) == 1:
            if chosen[0] is not members[0]:
                overrides[kept] = chosen[0]
            continue
        for m, d in differ:
            problems.append(f"{kept!r} (from {', '.join(members[0].sources)}) and {m.target!r} (from "
                            f"{', '.join(m.sources)}) are one tensor in {p.target}, but {p.source} gives them "
                            f"different values (max |a-b| = {d}); pass tied='first' to take the value of {kept!r}, "
                            f"or tied={m.target!r} for the other")
    if problems:
        head = f"cannot load {p.source} into {p.target}; nothing was changed ({len(problems)} tie(s) given two values):"
        raise PlanError("\n  - ".join([head, *problems]), problems=problems)
    return _choose(p, src, overrides) if overrides else p


def _choose(p: LoadPlan, src: Source, overrides: Mapping[str, Step]) -> LoadPlan:
    """A copy of ``p`` where each overridden target takes its value the way the given step does."""
    import dataclasses

    from .plan import Unused

    steps, unused = [], list(p.unused)
    for s in p.steps:
        pick = overrides.get(s.target)
        if pick is None:
            steps.append(s)
            continue
        steps.append(dataclasses.replace(pick, target=s.target, kind=s.kind, shape=s.shape, dtype=s.dtype,
                                         note=f"chosen by tied= over {', '.join(s.sources)}"))
        unused = [u for u in unused if u.key not in pick.sources]
        unused += [Unused(k, src.specs[k][0], f"{s.target!r} took the value of {', '.join(pick.sources)} (tied=)",
                          expected=True) for k in s.sources]
    chosen = dataclasses.replace(p, steps=steps, unused=unused, shadowed={})  # the ties are settled
    return chosen


def tie_picks(tied: Any) -> set[str]:
    if isinstance(tied, str):
        return {tied}
    if isinstance(tied, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in tied):
        return set(tied)
    raise UsageError(f"tied must be 'error', 'first', or key name(s) whose value wins; got {tied!r}")


def _read(step: Step, src: Source, current: Any) -> Any:
    """A step's value, read in (a file cut short raises here, not SIGBUS while comparing)."""
    from ..io._base import read_in

    try:
        value = value_of(step, src, current)
        read_in(value, f"{src.name} (for {step.target!r})")
        return value
    except (OSError, RuntimeError, ValueError) as e:
        raise PlanError(f"cannot read {', '.join(step.sources)} from {src.name} for {step.target}: {e}; "
                        "nothing was changed") from e


def _difference(a: Any, b: Any, dtype: Any) -> str:
    """``""`` where ``a`` and ``b`` are equal as ``dtype`` (NaN equal to NaN), else max |a - b| as text."""
    import torch

    a = a.detach().to(dtype=dtype)
    b = b.detach().to(device=a.device, dtype=dtype)
    if torch.equal(a, b):
        return ""
    if a.is_floating_point() or a.is_complex():
        both_nan = a.isnan() & b.isnan()
        if bool(((a == b) | both_nan).all()):
            return ""
        wide = torch.complex128 if a.is_complex() else torch.float64
        gap = (a.to(wide) - b.to(wide)).abs().masked_fill(both_nan, 0)
        return f"{float(gap.nan_to_num(nan=float('inf')).max()):.6g}"
    return f"{int((a.to(torch.int64) - b.to(torch.int64)).abs().max())}"


def unaliased(staged: dict[str, Any], state: Mapping[str, Any], touched: Sequence[str]) -> None:
    """Copy each staged value that shares memory with a tensor about to be written.

    A source may be the model itself (``{"a": m.b, "b": m.a}``): writing ``a`` first would
    change the value ``b`` then reads. A value that is its own target, exactly, stays (its
    write changes nothing).
    """
    from .._slots import Memory, same_view

    memory = Memory(state[k] for k in touched)
    for key, value in staged.items():
        if memory.overlaps(value) and not same_view(value, state[key]):
            staged[key] = value.clone()


def fill_missing(model: Any, p: LoadPlan, *, seed: int | None, device: Any = None) -> None:
    """Run the plan's ``init`` rules on the missing keys they fill."""
    initializers = p.initializers
    by_rule: dict[int, tuple[Any, set[str]]] = {}
    for s in p.unsourced:
        if s.fill and s.fill.startswith("init: "):
            how = initializers.get(s.target, s.fill[len("init: "):])
            by_rule.setdefault(id(how), (how, set()))[1].add(s.target)
    if not by_rule:
        return
    from ..init import init_

    # one call: init_ checks every rule before it writes anything
    init_(model, [(lambda n, _p, names=names: n in names, how) for how, names in by_rule.values()],
          seed=seed, device=device)


def writing_may_fail(model: Any, staged: Mapping[str, Any] | None, state: Mapping[str, Any], p: LoadPlan) -> bool:
    """Whether a load can still fail once the plan and every value are checked.

    It can where code other than torch's runs while writing (a module's own loading code,
    load hooks, a callable initializer) or where a value comes from a device into host memory
    (see `_slots.may_fail`); copying checked values between plain tensors cannot fail.
    ``staged=None``: the values are plain host tensors read from a file (only the targets are
    looked at).
    """
    from torch import nn

    from .._slots import may_fail

    if type(model).load_state_dict is not nn.Module.load_state_dict:
        return True
    for module in model.modules():
        if module._load_state_dict_pre_hooks or module._load_state_dict_post_hooks:
            return True
        own = type(module)._load_from_state_dict
        if own is not nn.Module._load_from_state_dict and not own.__module__.startswith("torch.nn."):
            return True
    if staged is None:  # what a file gives: plain host tensors
        import torch

        staged = dict.fromkeys((s.target for s in p.loaded), torch.empty(0))
    if any(may_fail(value, state[key]) for key, value in staged.items()):
        return True
    return any(callable(how) for how in p.initializers.values())


def checked(model: Any, source: Any, plan: LoadPlan | None, options: dict[str, Any], *, strict: bool,
             min_coverage: float, on_meta: str,
             tied: str | Sequence[str] = "error") -> tuple[Any, LoadPlan, Source, dict[str, Any]]:
    """The source (a path opened, with ``root`` and ``trust`` from ``options``), the plan for
    loading it into ``model``, checked, and the model's state.

    Refuses targets on the meta device (``on_meta`` says what to do instead), targets that
    cannot be written in place, and tied targets given two values (unless ``tied`` picks one:
    the plan returned then takes it).
    """
    tie_picks(tied)
    if isinstance(source, (str, PurePath)):
        from ..checkpoint import open as open_checkpoint

        source = open_checkpoint(source, root=options.pop("root", None), trust=options.pop("trust", False))
    p, src = resolve(model, source, plan, options)
    check_plan(p, strict=strict, min_coverage=min_coverage)
    state = model.state_dict(keep_vars=True)
    meta = [s.target for s in p.steps if state[s.target].is_meta and s.how != "tied"]
    if meta:
        raise ModelError(f"{len(meta)} target tensor(s) are on the meta device (e.g. {meta[0]!r}); {on_meta}")
    from .._slots import unwritable

    bad = unwritable((k, state[k]) for k in written_keys(p))
    if bad:
        raise AssignError("\n  - ".join([f"cannot load {p.source} into {p.target}; nothing was changed: "
                                         f"{len(bad)} target tensor(s) cannot be written in place:", *bad]),
                          problems=tuple(bad))
    return source, settle_ties(p, src, state, tied=tied), src, state


def written_keys(p: LoadPlan) -> list[str]:
    """The target keys a load writes: those loaded, and those an ``init`` rule fills."""
    return [s.target for s in p.steps if s.loaded or (s.fill or "").startswith("init: ")]


def report_of(p: LoadPlan) -> LoadReport:
    return LoadReport(source=p.source, target=p.target, loaded=len(p.loaded),
                      filled=len(p.steps) - len(p.loaded), coverage=p.coverage,
                      provenance={s.target: _provenance(s) for s in p.steps},
                      unused={u.key: u.reason for u in p.unused})


def in_place_from_dcp(model: Any, p: LoadPlan, source: Any, state: Mapping[str, Any]) -> bool:
    """Whether a checked load reads a DCP folder straight onto the targets (no second copy).

    Only where nothing can fail once the reads are checked, and no two targets share memory
    (those are checked against staged values, see `commit`).
    """
    from .._slots import overlapping_groups
    from ..checkpoint import Checkpoint

    return (isinstance(source, Checkpoint) and source.format == "dcp" and not writing_may_fail(model, None, state, p)
            and not overlapping_groups([state[s.target] for s in p.loaded]))


def commit(model: Any, p: LoadPlan, src: Source, source: Any, state: Mapping[str, Any], *,
           seed: int | None) -> LoadReport:
    """Stage every value of a checked plan, then write them all through ``load_state_dict``.

    Nothing is written before every value is read in and checked; where writing itself can
    still fail a backup is kept and put back (see `load_`).
    """
    from .._slots import find_clashes, uninterrupted, write_mode
    from ..checkpoint import Checkpoint

    opened = isinstance(source, Checkpoint)
    touched = written_keys(p)
    staged = stage(p, src, state)
    if opened:  # a file: its tensors are mapped
        from ..io._base import read_in

        for key, value in staged.items():  # a file cut short raises here, not SIGBUS mid-copy
            read_in(value, f"{src.name} (for {key!r})")
    unaliased(staged, state, touched)
    clashes = find_clashes([(key, state[key], value) for key, value in staged.items()])  # in load_state_dict's order
    if clashes:
        raise AssignError("\n  - ".join([f"cannot load {p.source} into {p.target}; nothing was changed:", *clashes]),
                          problems=tuple(clashes))
    # everything was checked: a backup is kept only where writing can still fail
    backup = {k: state[k].detach().clone() for k in touched} if writing_may_fail(model, staged, state, p) else {}
    flags = {k: v.requires_grad for k, v in state.items()}
    targets = [state[k] for k in touched]
    try:
        with uninterrupted(), write_mode(targets):  # Ctrl-C is delivered once the model is whole again
            fill_missing(model, p, seed=seed)  # init_ checks every rule before it writes
            result = model.load_state_dict(staged, strict=False)
            if result.unexpected_keys:
                raise ModelError(f"the model refused keys {result.unexpected_keys[:5]}")
    except BaseException as e:
        with write_mode(targets):
            for k, v in backup.items():
                state[k].copy_(v)
        for k, v in state.items():
            if v.is_leaf and v.is_floating_point():
                v.requires_grad_(flags[k])
        if isinstance(e, Exception) and not isinstance(e, WeightsmithError):
            kept = ("every value written was put back, the model is unchanged" if backup
                    else "the model may be partly written")
            raise ModelError(f"loading {p.source} into {p.target} failed while writing "
                             f"({type(e).__name__}: {e}); {kept}") from e
        raise
    return report_of(p)
