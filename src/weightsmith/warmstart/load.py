"""`load_`, `build` and `transfer`: the front doors of a warm-start (see `execute` for the engine)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import PurePath
from typing import Any

from ..errors import ModelError, PlanError
from .._tensors import is_dtensor
from .execute import (LoadReport, check_plan, checked, commit, fill_missing, in_place_from_dcp, report_of, settle_ties,
                      stage, tie_picks, value_of)
from .plan import LoadPlan, PlanOptions, Step, as_source, make

__all__ = ["load_", "build", "transfer", "LoadReport", "empty_init"]


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
    if any(is_dtensor(t) for t in (*model.parameters(), *model.buffers())):  # sharded: each rank loads its part
        from ..distributed.sharded_load import load_sharded_

        return load_sharded_(model, source, plan=plan, strict=strict, min_coverage=min_coverage, seed=seed,
                             tied=tied, **plan_options)
    source, p, src, state = checked(model, source, plan, dict(plan_options), strict=strict,
                                    min_coverage=min_coverage, tied=tied,
                                    on_meta="use weightsmith.build() to construct and load in one step")
    if in_place_from_dcp(model, p, source, state):
        from ..distributed.sharded_load import load_dcp_in_place

        return load_dcp_in_place(model, p, src, source, seed=seed)
    return commit(model, p, src, source, state, seed=seed)


def transfer(source: Any, target: Any, *, strict: bool = False, min_coverage: float = 0.5,
             tied: str | Sequence[str] = "error", **plan_options: Any) -> tuple[dict[str, Any], LoadReport]:
    """A state dict shaped like ``target`` (a checkpoint, path or state dict) with values from ``source``.

    The checkpoint-to-checkpoint form of `load_`: keys the source cannot fill keep the target's
    own values; ``tied`` is as for `load_` (the target's ties are those of its file). Nothing is
    written in place: the result is a new dict (its values may be the source's or the target's
    own tensors). Used by ``weightsmith warmstart`` when the target is a file.
    """
    from pathlib import Path

    from ..checkpoint import Checkpoint, open as open_checkpoint

    if plan_options.get("init") is not None:
        raise PlanError("init rules need a model; with a checkpoint target, missing keys keep its values")
    options = PlanOptions.of(plan_options)
    tgt = open_checkpoint(target) if isinstance(target, (str, Path)) else target
    src = as_source(source, root=options.root, trust=options.trust)
    tie_picks(tied)
    p = make(tgt, src, options)
    check_plan(p, strict=strict, min_coverage=min_coverage)
    current = tgt.load() if isinstance(tgt, Checkpoint) else dict(tgt)
    out = dict(current)
    p = settle_ties(p, src, current, tied=tied)
    for key, value in stage(p, src, current).items():
        out[key] = value.to(dtype=current[key].dtype)
    for step in p.steps:
        if step.tied_to is not None:
            out[step.target] = out[step.tied_to]
    return out, report_of(p)


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

    from .._slots import materialize, registrations, replace_parameter
    from ..checkpoint import Checkpoint

    tie_picks(tied)
    options = PlanOptions.of(plan_options, init=init)

    with empty_init():
        model = factory()
    if not isinstance(model, nn.Module):
        raise ModelError(f"the factory returned a {type(model).__name__}, not an nn.Module")
    target = torch.device(device)
    src = as_source(source, root=options.root, trust=options.trust)
    p = make(model, src, options)
    check_plan(p, strict=strict, min_coverage=min_coverage)
    state = model.state_dict(keep_vars=True)
    slots = registrations(model)
    # 1. what is missing or adapted: materialize empty, then initialize
    pending = [s for s in p.steps if s.kind == "parameter" and state[s.target].is_meta
               and (s.how in ("missing", "skipped") or s.adapted)]
    for old in {id(state[s.target]): state[s.target] for s in pending}.values():
        materialize(slots, old, target)
    _initialize(model, p, pending, slots, seed=seed, device=target)
    state = model.state_dict(keep_vars=True)
    p = settle_ties(p, src, state, tied=tied)
    # 2. what the checkpoint has: put in place, mapped from the file where possible
    with torch.no_grad():
        values = {step.target: value_of(step, src, state[step.target])
                  .to(device=target, dtype=state[step.target].dtype) for step in p.loaded}
        _apart(values, None if isinstance(source, (str, PurePath, Checkpoint))
               else [src.get(k) for step in p.loaded for k in step.sources])
        for step in p.loaded:
            value = values[step.target]
            old = state[step.target]
            if step.kind == "parameter":
                # init_ may have replaced a Parameter behind our back: then its owner is found by name
                replace_parameter(slots, old, nn.Parameter(value, requires_grad=old.requires_grad),
                         fallback=[_owner(model, step.target)])
            else:
                mod, attr = _owner(model, step.target)
                mod._buffers[attr] = value
    model.to(target)
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise ModelError(f"{len(left)} tensor(s) were neither loaded nor initialized, e.g. {left[0]!r}")
    return model, report_of(p)


def _apart(values: dict[str, Any], caller: list[Any] | None) -> None:
    """Copy values so that none shares memory with the ``caller``'s tensors or with another value.

    Each value becomes a tensor of its own in the built model: two Parameters over one memory
    would be coupled without being tied (each stepped by an optimizer), and a model sharing a
    caller's state dict would change with it.
    """
    from .._slots import Memory, overlapping_groups

    if caller is not None:
        memory = Memory(caller)
        for key, value in values.items():
            if memory.overlaps(value):
                values[key] = value.clone()
    keys = list(values)
    for group in overlapping_groups(list(values.values())):
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

    from .._slots import materialize

    fill_missing(model, p, seed=seed, device=device)
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
                    materialize(slots, old, device)
                for n in mine:  # uninitialized memory: NaN shows what _init_weights leaves unset
                    model.get_parameter(n).fill_(float("nan"))
                own_init(mod)
            if all(not model.get_parameter(n).isnan().any() for n in mine):
                continue
            for n in mine:
                rest[n].fill = "reset_parameters (the model's _init_weights does not cover it)"
        if hasattr(mod, "reset_parameters"):
            for old in {id(t): t for t in mod.parameters(recurse=False) if t.is_meta}.values():
                materialize(slots, old, device)
            mod.reset_parameters()
            continue
        with torch.no_grad():
            for n in mine:
                model.get_parameter(n).zero_()
                rest[n].fill = "zeros (its module has no reset_parameters)"
