"""`load_` and `build`: execute a `LoadPlan`, all or nothing, with a report of where each value came from."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from ._result import Result
from .errors import AssignError, ModelError, UsageError, WeightsmithError
from .keymap import apply_transform, parse_transforms
from .plan import LoadPlan, PlanError, Source, Step, as_source, format_share, plan as make_plan

__all__ = ["load_", "build", "transfer", "LoadReport", "empty_init"]


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

        from .listing import fold_name

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
    from .listing import fold_name

    return " + ".join(fold_name(p) if i == 0 else p for i, p in enumerate(text.split(" + ", 1)))


def _provenance(step: Step) -> str:
    if step.how in ("missing", "skipped"):
        return (step.fill or "current value") + (f" (skipped: {step.note})" if step.how == "skipped" else "")
    if step.how == "tied":
        return step.note
    text = ", ".join(step.sources)
    return text + (" + " + ", ".join(step.transforms) if step.transforms else "")


def _check(p: LoadPlan, *, strict: bool, min_coverage: float) -> None:
    problems = p.refusals(strict=strict, min_coverage=min_coverage)  # the plan's verdict says the same
    if problems:
        head = f"cannot load {p.source} into {p.target}; nothing was changed ({len(problems)} problem(s)):"
        raise PlanError("\n  - ".join([head, *problems[:50]]) + ("\n  ..." if len(problems) > 50 else ""),
                        problems=problems)


def _resolve(model: Any, source: Any, plan: LoadPlan | None, options: dict[str, Any]) -> tuple[LoadPlan, Source]:
    if plan is not None:
        if options:
            raise PlanError(f"pass either plan= or plan options ({', '.join(options)}), not both")
        src = as_source(source)
        if src.fingerprint != plan.fingerprint:
            raise PlanError(f"the plan was made for another source ({plan.source}, fingerprint "
                            f"{plan.fingerprint}), not {src.name} ({src.fingerprint}); make a new plan")
        return plan, src
    root, trust = options.pop("root", None), options.pop("trust", False)
    src = as_source(source, root=root, trust=trust)
    return make_plan(model, src, **options), src


def _value(step: Step, src: Source, current: Any) -> Any:
    """The value a loaded step writes: source tensor(s) through the rule transforms and any adapter."""
    from .adapt import find_adapter

    tensors = [src.get(k) for k in step.sources]
    rule = [t for t in step.transforms if not t.startswith(("adapt:", "cast "))]
    value = apply_transform(tensors, parse_transforms(" | ".join(rule)), index=step.index) if rule else tensors[0]
    if any(t.startswith("adapt:") for t in step.transforms):
        adapter = find_adapter(step.target, tuple(value.shape), step.shape)
        if adapter is None:  # plan and execution disagree: a bug, not bad input
            raise ModelError(f"{step.target}: no adapter for {tuple(value.shape)} -> {step.shape}")
        value = adapter.fn(value, current)
    return value


def _stage(p: LoadPlan, src: Source, state: Mapping[str, Any]) -> dict[str, Any]:
    """Read and transform every value before anything is written; an error here changes nothing."""
    staged = {}
    for step in p.loaded:
        try:
            staged[step.target] = _value(step, src, state[step.target])
        except (OSError, RuntimeError, ValueError) as e:
            raise PlanError(f"cannot read {', '.join(step.sources)} from {src.name} for {step.target}: {e}; "
                            "nothing was changed") from e
    return staged


def _settle_ties(p: LoadPlan, src: Source, state: Mapping[str, Any], *, tied: str | Sequence[str]) -> LoadPlan:
    """Check the tied targets the source gives a value more than once; the plan with the winners.

    A tie is one tensor under several names: when the source has a value for more than one of
    them, the plan loads the first name's and drops the rest. Equal values (after the cast to
    the target's dtype) load as planned. Different values are refused, naming both keys and
    the largest difference, unless ``tied`` is ``"first"`` (the first name in the model's
    order wins) or names the key (target or source) whose value wins; the plan returned then
    takes that key's value. Values are read for the comparison only where such keys exist.
    """
    shadowed: dict[str, Step] = getattr(p, "_shadowed", {})
    picks = _tie_picks(tied)
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
    chosen = dataclasses.replace(p, steps=steps, unused=unused)
    chosen._initializers = getattr(p, "_initializers", {})
    chosen._shadowed = {}  # settled
    return chosen


def _tie_picks(tied: Any) -> set[str]:
    if isinstance(tied, str):
        return {tied}
    if isinstance(tied, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in tied):
        return set(tied)
    raise UsageError(f"tied must be 'error', 'first', or key name(s) whose value wins; got {tied!r}")


def _read(step: Step, src: Source, current: Any) -> Any:
    """A step's value, read in (a file cut short raises here, not SIGBUS while comparing)."""
    from .io._base import read_in

    try:
        value = _value(step, src, current)
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


def _unaliased(staged: dict[str, Any], state: Mapping[str, Any], touched: Sequence[str]) -> None:
    """Copy each staged value that shares memory with a tensor about to be written.

    A source may be the model itself (``{"a": m.b, "b": m.a}``): writing ``a`` first would
    change the value ``b`` then reads. A value that is its own target, exactly, stays (its
    write changes nothing).
    """
    from .assign import _Memory, _same_view

    memory = _Memory(state[k] for k in touched)
    for key, value in staged.items():
        if memory.overlaps(value) and not _same_view(value, state[key]):
            staged[key] = value.clone()


def _fill_missing(model: Any, p: LoadPlan, *, seed: int | None, device: Any = None) -> None:
    """Run the plan's ``init`` rules on the missing keys they fill."""
    initializers = getattr(p, "_initializers", {})
    by_rule: dict[int, tuple[Any, set[str]]] = {}
    for s in p.unsourced:
        if s.fill and s.fill.startswith("init: "):
            how = initializers.get(s.target, s.fill[len("init: "):])
            by_rule.setdefault(id(how), (how, set()))[1].add(s.target)
    if not by_rule:
        return
    from .init import init_

    # one call: init_ checks every rule before it writes anything
    init_(model, [(lambda n, _p, names=names: n in names, how) for how, names in by_rule.values()],
          seed=seed, device=device)


def load_(model: Any, source: Any, *, plan: LoadPlan | None = None, strict: bool = True,
          min_coverage: float = 0.5, seed: int | None = None, tied: str | Sequence[str] = "error",
          **plan_options: Any) -> LoadReport:
    """Load a checkpoint into a live model by a plan, all or nothing.

    The whole plan is checked first; every value is then read and transformed; only then is
    anything written, through the model's own ``load_state_dict`` (so modules that customize
    loading keep working), into the existing Parameters (optimizers holding them keep working,
    ties survive). Values are cast to each target's dtype and moved to its device. A failed load
    leaves the model bit for bit as it was: bad input and unreadable bytes are found before the
    first write, and where writing itself can still fail (a module's own loading code, load
    hooks, a callable initializer, a copy from a device into host memory) a backup is kept and
    put back; otherwise no second copy of the model is made. Ctrl-C during the write is held
    until the model is whole. Targets that cannot take a value in place (expanded or overlapping
    memory, read-only mappings, sparse tensors) are refused before the first write; tensors made
    under ``torch.inference_mode()`` are written under it. A source that shares memory with the
    model (its own tensors, swapped by a rename) is copied before anything is written.

    Args:
        model: the target ``nn.Module``.
        source: a path, a `Checkpoint`, a state dict or a model.
        plan: a `LoadPlan` made earlier for this source (refused if made from another one).
        strict: every target key must get a value (from the source or an ``init`` rule) and
            every source key must be used or explained.
        min_coverage: even when not strict, refuse a load that fills less than this fraction
            of the target's parameters from the source (a load that matches nothing is always
            refused).
        seed: seed for ``init`` rules filling missing keys.
        tied: when the source gives tied target keys (one tensor under several names) different
            values: ``"error"`` refuses, naming both keys and max |a-b|; ``"first"`` takes the
            value of the first name in the model's order; a key name (target or source), or a
            list of them, one per tie, takes that key's value. Equal values always load.
        **plan_options: `plan` options (``rename``, ``match``, ``on_mismatch``, ``init``, ``root``,
            ``trust``).

    A model whose parameters are ``DTensor`` shards is loaded by
    `weightsmith.distributed.load_sharded_` (every rank calls it; each reads only its part).

    Returns:
        a `LoadReport` with each target key's provenance.

    >>> import weightsmith as ws                                            # doctest: +SKIP
    >>> ws.load_(model_b, "a.safetensors", rename=[("conv1", "backbone_conv")], strict=False)  # doctest: +SKIP
    """
    from .assign import _clashes, _overlapping, _uninterrupted, _write_mode

    if any(type(t).__name__ == "DTensor" for t in model.parameters()):  # sharded: each rank loads its part
        from .distributed import load_sharded_

        return load_sharded_(model, source, plan=plan, strict=strict, min_coverage=min_coverage, seed=seed,
                             tied=tied, **plan_options)
    from .checkpoint import Checkpoint

    source, p, src, state = _checked(model, source, plan, dict(plan_options), strict=strict,
                                     min_coverage=min_coverage, tied=tied,
                                     on_meta="use weightsmith.build() to construct and load in one step")
    opened = isinstance(source, Checkpoint)
    touched = _touched(p)
    # targets over one memory are checked against the staged values (below): not in place
    if (opened and source.format == "dcp" and not _writing_may_fail(model, None, state, p)
            and not _overlapping([state[s.target] for s in p.loaded])):
        return _load_dcp_in_place(model, p, src, source, seed=seed)
    staged = _stage(p, src, state)
    if opened:  # a file: its tensors are mapped
        from .io._base import read_in

        for key, value in staged.items():  # a file cut short raises here, not SIGBUS mid-copy
            read_in(value, f"{src.name} (for {key!r})")
    _unaliased(staged, state, touched)
    clashes = _clashes([(key, state[key], value) for key, value in staged.items()])  # in load_state_dict's order
    if clashes:
        raise AssignError("\n  - ".join([f"cannot load {p.source} into {p.target}; nothing was changed:", *clashes]),
                          problems=tuple(clashes))
    # everything was checked: a backup is kept only where writing can still fail
    backup = {k: state[k].detach().clone() for k in touched} if _writing_may_fail(model, staged, state, p) else {}
    flags = {k: v.requires_grad for k, v in state.items()}
    targets = [state[k] for k in touched]
    try:
        with _uninterrupted(), _write_mode(targets):  # Ctrl-C is delivered once the model is whole again
            _fill_missing(model, p, seed=seed)  # init_ checks every rule before it writes
            result = model.load_state_dict(staged, strict=False)
            if result.unexpected_keys:
                raise ModelError(f"the model refused keys {result.unexpected_keys[:5]}")
    except BaseException as e:
        with _write_mode(targets):
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
    return _report(p)


def _load_dcp_in_place(model: Any, p: LoadPlan, src: Source, source: Any, *, seed: int | None) -> LoadReport:
    """A DCP folder into plain torch modules, with no second copy of the model.

    A tensor saved by several ranks is in several chunks; assembling each before writing
    would hold the whole model twice. Instead ``dcp.load`` plans each chunk's region onto its
    target, the regions are read in and checked (nothing written), and only then copied in,
    as a sharded load does on each rank.
    """
    from .assign import _uninterrupted, _write_mode
    from .distributed import _Work

    work = _Work(model, p, src, source)
    try:
        work.read_collective()
        staged = work.stage()
        state = model.state_dict(keep_vars=True)
        with _uninterrupted(), _write_mode(state[k] for k in _touched(p)):
            _fill_missing(model, p, seed=seed)  # init_ checks every rule before it writes
            work.commit(staged)
    finally:
        work.close()
    return _report(p)


def _writing_may_fail(model: Any, staged: Mapping[str, Any] | None, state: Mapping[str, Any], p: LoadPlan) -> bool:
    """Whether a load can still fail once the plan and every value are checked.

    It can where code other than torch's runs while writing (a module's own loading code,
    load hooks, a callable initializer) or where a value comes from a device into host memory
    (see `assign._may_fail`); copying checked values between plain tensors cannot fail.
    ``staged=None``: the values are plain host tensors read from a file (only the targets are
    looked at).
    """
    from torch import nn

    from .assign import _may_fail

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
    if any(_may_fail(value, state[key]) for key, value in staged.items()):
        return True
    return any(callable(how) for how in getattr(p, "_initializers", {}).values())


def _checked(model: Any, source: Any, plan: LoadPlan | None, options: dict[str, Any], *, strict: bool,
             min_coverage: float, on_meta: str,
             tied: str | Sequence[str] = "error") -> tuple[Any, LoadPlan, Source, dict[str, Any]]:
    """The source (a path opened, with ``root`` and ``trust`` from ``options``), the plan for
    loading it into ``model``, checked, and the model's state.

    Refuses targets on the meta device (``on_meta`` says what to do instead), targets that
    cannot be written in place, and tied targets given two values (unless ``tied`` picks one:
    the plan returned then takes it).
    """
    _tie_picks(tied)
    if isinstance(source, (str, PurePath)):
        from .checkpoint import open as open_checkpoint

        source = open_checkpoint(source, root=options.pop("root", None), trust=options.pop("trust", False))
    p, src = _resolve(model, source, plan, options)
    _check(p, strict=strict, min_coverage=min_coverage)
    state = model.state_dict(keep_vars=True)
    meta = [s.target for s in p.steps if state[s.target].is_meta and s.how != "tied"]
    if meta:
        raise ModelError(f"{len(meta)} target tensor(s) are on the meta device (e.g. {meta[0]!r}); {on_meta}")
    from .assign import _unwritable

    bad = _unwritable((k, state[k]) for k in _touched(p))
    if bad:
        raise AssignError("\n  - ".join([f"cannot load {p.source} into {p.target}; nothing was changed: "
                                         f"{len(bad)} target tensor(s) cannot be written in place:", *bad]),
                          problems=tuple(bad))
    return source, _settle_ties(p, src, state, tied=tied), src, state


def _touched(p: LoadPlan) -> list[str]:
    """The target keys a load writes: those loaded, and those an ``init`` rule fills."""
    return [s.target for s in p.steps if s.loaded or (s.fill or "").startswith("init: ")]


def _report(p: LoadPlan) -> LoadReport:
    return LoadReport(source=p.source, target=p.target, loaded=len(p.loaded),
                      filled=len(p.steps) - len(p.loaded), coverage=p.coverage,
                      provenance={s.target: _provenance(s) for s in p.steps},
                      unused={u.key: u.reason for u in p.unused})


def transfer(source: Any, target: Any, *, strict: bool = False, min_coverage: float = 0.5,
             tied: str | Sequence[str] = "error", **plan_options: Any) -> tuple[dict[str, Any], LoadReport]:
    """A state dict shaped like ``target`` (a checkpoint, path or state dict) with values from ``source``.

    The checkpoint-to-checkpoint form of `load_`: keys the source cannot fill keep the target's
    own values; ``tied`` is as for `load_` (the target's ties are those of its file). Nothing is
    written in place: the result is a new dict (its values may be the source's or the target's
    own tensors). Used by ``weightsmith warmstart`` when the target is a file.
    """
    from pathlib import Path

    from .checkpoint import Checkpoint, open as open_checkpoint

    if plan_options.get("init") is not None:
        raise PlanError("init rules need a model; with a checkpoint target, missing keys keep its values")
    tgt = open_checkpoint(target) if isinstance(target, (str, Path)) else target
    options = dict(plan_options)
    root, trust = options.pop("root", None), options.pop("trust", False)
    src = as_source(source, root=root, trust=trust)
    _tie_picks(tied)
    p = make_plan(tgt, src, **options)
    _check(p, strict=strict, min_coverage=min_coverage)
    current = tgt.load() if isinstance(tgt, Checkpoint) else dict(tgt)
    out = dict(current)
    p = _settle_ties(p, src, current, tied=tied)
    for key, value in _stage(p, src, current).items():
        out[key] = value.to(dtype=current[key].dtype)
    for step in p.steps:
        if step.tied_to is not None:
            out[step.target] = out[step.tied_to]
    return out, _report(p)


# -- build -------------------------------------------------------------------------------------
_INIT_NAMES = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
               "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
               "sparse_")


@contextlib.contextmanager
def empty_init() -> Iterator[None]:
    """Construct modules with parameters on the meta device and no initialization run.

    Buffers stay real (a non-persistent buffer such as BERT's ``position_ids`` is in no checkpoint
    and must not be left on meta). ``torch.nn.init`` functions do nothing inside the block: values
    that a checkpoint will overwrite are not worth computing.
    """
    import torch
    from torch import nn

    original_register = nn.Module.register_parameter
    originals = {name: getattr(nn.init, name) for name in _INIT_NAMES}

    def register(self: nn.Module, name: str, param: Any) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original_register(self, name, param)

    def skip(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        return tensor

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    for name in _INIT_NAMES:
        setattr(nn.init, name, skip)
    try:
        with torch.device("cpu"):
            yield
    finally:
        nn.Module.register_parameter = original_register  # type: ignore[method-assign]
        for name, fn in originals.items():
            setattr(nn.init, name, fn)


def _owner(model: Any, name: str) -> tuple[Any, str]:
    mod_name, _, attr = name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


def build(factory: Callable[[], Any], source: Any, *, device: Any = "cpu", init: Any = None,
          strict: bool = True, min_coverage: float = 0.5, seed: int | None = None,
          tied: str | Sequence[str] = "error", **plan_options: Any) -> tuple[Any, LoadReport]:
    """Construct a model and load a checkpoint into it, with one copy of the parameters.

    The model is built with its parameters on the meta device and no initialization run
    (`empty_init`); what the checkpoint has is put in place directly (memory-mapped from the
    file when no cast or transform is needed: no second copy); only what is missing is
    initialized — by ``init`` rules, else by the owning module's ``reset_parameters``.
    Values from a state dict or model in memory are copied (the built model never shares
    memory with the caller's tensors), and no two untied tensors of the model share memory.

    Args:
        factory: a callable returning the ``nn.Module`` (a class, or a function).
        source: a path, a `Checkpoint`, a state dict or a model.
        device: where the parameters end up.
        init: ``(selector, initializer)`` rules for missing keys (as for `init_`).
        strict, min_coverage, seed, tied, **plan_options: as for `load_`.

    Returns:
        ``(model, report)``.
    """
    import torch
    from torch import nn

    from .assign import _materialize, _registrations, _replace
    from .checkpoint import Checkpoint

    _tie_picks(tied)

    with empty_init():
        model = factory()
    if not isinstance(model, nn.Module):
        raise ModelError(f"the factory returned a {type(model).__name__}, not an nn.Module")
    target = torch.device(device)
    options = dict(plan_options)
    root, trust = options.pop("root", None), options.pop("trust", False)
    src = as_source(source, root=root, trust=trust)
    p = make_plan(model, src, init=init, **options)
    _check(p, strict=strict, min_coverage=min_coverage)
    state = model.state_dict(keep_vars=True)
    slots = _registrations(model)
    # 1. what is missing or adapted: materialize empty, then initialize
    pending = [s for s in p.steps if s.kind == "parameter" and state[s.target].is_meta
               and (s.how in ("missing", "skipped") or any(t.startswith("adapt:") for t in s.transforms))]
    for old in {id(state[s.target]): state[s.target] for s in pending}.values():
        _materialize(slots, old, target)
    _initialize(model, p, pending, slots, seed=seed, device=target)
    state = model.state_dict(keep_vars=True)
    p = _settle_ties(p, src, state, tied=tied)
    # 2. what the checkpoint has: put in place, mapped from the file where possible
    with torch.no_grad():
        values = {step.target: _value(step, src, state[step.target])
                  .to(device=target, dtype=state[step.target].dtype) for step in p.loaded}
        _apart(values, None if isinstance(source, (str, PurePath, Checkpoint))
               else [src.get(k) for step in p.loaded for k in step.sources])
        for step in p.loaded:
            value = values[step.target]
            old = state[step.target]
            if step.kind == "parameter":
                # init_ may have replaced a Parameter behind our back: then its owner is found by name
                _replace(slots, old, nn.Parameter(value, requires_grad=old.requires_grad),
                         fallback=[_owner(model, step.target)])
            else:
                mod, attr = _owner(model, step.target)
                mod._buffers[attr] = value
    model.to(target)
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise ModelError(f"{len(left)} tensor(s) were neither loaded nor initialized, e.g. {left[0]!r}")
    return model, _report(p)


def _apart(values: dict[str, Any], caller: list[Any] | None) -> None:
    """Copy values so that none shares memory with the ``caller``'s tensors or with another value.

    Each value becomes a tensor of its own in the built model: two Parameters over one memory
    would be coupled without being tied (each stepped by an optimizer), and a model sharing a
    caller's state dict would change with it.
    """
    from .assign import _Memory, _overlapping

    if caller is not None:
        memory = _Memory(caller)
        for key, value in values.items():
            if memory.overlaps(value):
                values[key] = value.clone()
    keys = list(values)
    for group in _overlapping(list(values.values())):
        for _, i in group[1:]:  # the first keeps the memory, the others get their own
            values[keys[i]] = values[keys[i]].clone()


def _initialize(model: Any, p: LoadPlan, pending: list[Step], slots: dict[int, list[tuple[Any, str]]],
                *, seed: int | None, device: Any) -> None:
    """``init`` rules where given; else the model's own initialization.

    A transformers model initializes a new key as ``from_pretrained`` does, with its own
    ``_init_weights`` on the owning module; other models use each owning module's
    ``reset_parameters``. A module with some parameters loaded and some missing is initialized
    whole first (its loaded parameters are put in place afterwards); a parameter that neither
    initializes is zeroed, and the plan says so.
    """
    import torch

    from .assign import _materialize

    _fill_missing(model, p, seed=seed, device=device)
    rest = {s.target: s for s in pending if not (s.fill or "").startswith("init: ")}
    own_init = getattr(model, "_init_weights", None)
    for mod_name, mod in model.named_modules():
        own = {f"{mod_name}.{n}" if mod_name else n: t for n, t in mod.named_parameters(recurse=False)}
        mine = [n for n in own if n in rest]
        if not mine:
            continue
        if callable(own_init):
            with torch.no_grad():
                for old in {id(t): t for t in own.values() if t.is_meta}.values():
                    _materialize(slots, old, device)
                for n in mine:  # uninitialized memory: NaN shows what _init_weights leaves unset
                    model.get_parameter(n).fill_(float("nan"))
                own_init(mod)
            if all(not model.get_parameter(n).isnan().any() for n in mine):
                continue
            for n in mine:
                rest[n].fill = "reset_parameters (the model's _init_weights does not cover it)"
        if hasattr(mod, "reset_parameters"):
            for old in {id(t): t for t in mod.parameters(recurse=False) if t.is_meta}.values():
                _materialize(slots, old, device)
            mod.reset_parameters()
            continue
        with torch.no_grad():
            for n in mine:
                model.get_parameter(n).zero_()
                rest[n].fill = "zeros (its module has no reset_parameters)"
