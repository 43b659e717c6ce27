"""Turn ``requires_grad`` on and off by selector: as calls, as a context manager, as saved state.

Freezing a BatchNorm layer's weight and bias does not freeze its running statistics: they keep
moving in every forward pass in training mode (pytorch#86590). ``norm_eval=True`` holds the
frozen norm layers in eval mode, even across later ``model.train()`` calls, until they are
unfrozen.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase  # BatchNorm*, SyncBatchNorm, InstanceNorm*

from ._result import Result
from .errors import ModelError
from .selectors import Selector, compile_selector, select as _select

__all__ = [
    "FreezeReport",
    "freeze_",
    "unfreeze_",
    "frozen",
    "freeze_state",
    "load_freeze_state_",
    "trainable",
]

_SHOWN = 30  # rows of names a rendered report shows before summarizing the rest


@dataclass
class FreezeReport(Result):
    """What `freeze_`, `unfreeze_` or `load_freeze_state_` did.

    Attributes:
        action: ``"freeze"``, ``"unfreeze"`` or ``"load"``.
        changed: names whose ``requires_grad`` flipped, in module order (a tied alias of a
            selected name flips with it and is listed too).
        unchanged: selected names that already had the requested flag.
        norm_eval: norm layers now held in eval mode (freeze) or released from it (unfreeze).
        trainable_params: elements that train after the call, tied parameters counted once.
        frozen_params: elements that do not.
    """

    SCHEMA = "weightsmith.freeze/1"

    action: str
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    norm_eval: list[str] = field(default_factory=list)
    trainable_params: int = 0
    frozen_params: int = 0

    def _rich_(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        table = Table("name", "result", title=f"weightsmith {self.action}", title_justify="left")
        rows = [(n, "changed") for n in self.changed] + [(n, "already so") for n in self.unchanged]
        for name, what in rows[:_SHOWN]:
            table.add_row(name, what)
        if len(rows) > _SHOWN:
            table.add_row(f"… {len(rows) - _SHOWN} more", "")
        held = "held in eval mode" if self.action != "unfreeze" else "released from eval mode"
        for path in self.norm_eval:
            table.add_row(path or "(model)", f"norm layer {held}")
        return Group(table, f"{len(self.changed)} changed, {len(self.unchanged)} already so; "
                            f"trainable {self.trainable_params:,}, frozen {self.frozen_params:,} elements")


@torch.no_grad()
def freeze_(model: nn.Module, select: Selector | None = None, *, norm_eval: bool = False) -> FreezeReport:
    """Set ``requires_grad=False`` on the selected parameters (all when ``select`` is None).

    Args:
        model: the model to change.
        select: which parameters; ``"!head"`` freezes everything except the head.
        norm_eval: also hold every norm layer with running statistics whose parameters are
            all frozen now (and that the selection touches) in eval mode, even across later
            ``model.train()`` calls, so its statistics stop moving too. `unfreeze_` releases it.

    Returns:
        A `FreezeReport`.

    Raises:
        SelectorError: the selector is malformed or matches nothing. Nothing is changed.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> freeze_(model, "!2").changed
    ['0.weight', '0.bias']
    """
    return _set(model, select, flag=False, norm_eval=norm_eval)


@torch.no_grad()
def unfreeze_(model: nn.Module, select: Selector | None = None) -> FreezeReport:
    """Set ``requires_grad=True`` on the selected parameters (all when ``select`` is None).

    Norm layers the selection touches that `freeze_` held in eval mode are released and take
    the model's current mode (``model.training``) again.

    Args:
        model: the model to change.
        select: which parameters.

    Returns:
        A `FreezeReport`.

    Raises:
        SelectorError: the selector is malformed or matches nothing. Nothing is changed.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> _ = freeze_(model)
    >>> unfreeze_(model, "2").changed
    ['2.weight', '2.bias']
    """
    return _set(model, select, flag=True, norm_eval=False)


@contextlib.contextmanager
def frozen(model: nn.Module, select: Selector | None = None, *, norm_eval: bool = False) -> Iterator[FreezeReport]:
    """Freeze within a ``with`` block, then restore every parameter's previous flag.

    On exit, even by an exception, every parameter gets back its exact ``requires_grad``, and
    the norm layers held in eval mode get back their training flag and their own ``train``.

    Args:
        model: the model to change.
        select: which parameters (all when None).
        norm_eval: as in `freeze_`.

    Yields:
        The `FreezeReport` of the freeze.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> with frozen(model, "0"):
    ...     model[0].weight.requires_grad
    False
    >>> model[0].weight.requires_grad
    True
    """
    flags = [(p, p.requires_grad) for p in _unique(model)]
    norms = {id(m): (m, m.training, m.__dict__.get("train")) for _, m in _norms(model)}
    report = freeze_(model, select, norm_eval=norm_eval)
    touched = {id(model.get_submodule(path)) for path in report.norm_eval}
    try:
        yield report
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, training, own_train in (norms[i] for i in touched):
            if own_train is None:
                module.__dict__.pop("train", None)
            else:
                module.__dict__["train"] = own_train
            module.training = training


def freeze_state(model: nn.Module) -> dict[str, bool]:
    """Every parameter name with its ``requires_grad``, JSON-ready (``json.dumps`` takes it).

    Args:
        model: the model to read.

    Returns:
        ``{name: requires_grad}`` in module order, tied aliases included.

    >>> freeze_state(nn.Linear(2, 1))
    {'weight': True, 'bias': True}
    """
    return {name: p.requires_grad for name, p in _named(model).items()}


@torch.no_grad()
def load_freeze_state_(model: nn.Module, state: Mapping[str, bool] | str, *, strict: bool = True) -> FreezeReport:
    """Restore flags saved by `freeze_state` (a mapping, or its JSON text).

    Args:
        model: the model to change.
        state: ``{name: requires_grad}``, or the same as JSON (e.g. from checkpoint metadata).
        strict: require exactly the model's parameter names; otherwise names missing from
            ``state`` keep their flag (unknown names are always an error).

    Returns:
        A `FreezeReport` with ``action="load"``.

    Raises:
        ModelError: the JSON is malformed, a value is not a bool, names are unknown or (with
            ``strict``) missing, or tied aliases are given different flags. Nothing is changed.

    >>> model = nn.Linear(2, 1)
    >>> load_freeze_state_(model, '{"weight": false, "bias": true}').changed
    ['weight']
    """
    if isinstance(state, str):
        try:
            state = json.loads(state)
        except json.JSONDecodeError as e:
            raise ModelError(f"freeze state is not valid JSON: {e}") from e
    if not isinstance(state, Mapping):
        raise ModelError(f"freeze state must map names to bools, not {type(state).__name__}")
    named = _named(model)
    problems = [f"{k!r}: expected a bool, got {v!r}" for k, v in state.items() if not isinstance(v, bool)]
    unknown = [k for k in state if k not in named]
    missing = [k for k in named if k not in state] if strict else []
    if unknown:
        problems.append(f"unknown names {unknown}")
    if missing:
        problems.append(f"missing names {missing} (pass strict=False to keep their flags)")
    wanted: dict[int, tuple[str, bool]] = {}
    for name, flag in state.items():
        if name in named and isinstance(flag, bool):
            first = wanted.setdefault(id(named[name]), (name, flag))
            if first[1] != flag:
                problems.append(f"{first[0]} and {name} are one tied parameter but get {first[1]} and {flag}")
    if problems:
        raise ModelError("cannot load freeze state: " + "; ".join(problems) + ". Nothing was changed.")
    before = {name: p.requires_grad for name, p in named.items()}
    for name, flag in state.items():
        named[name].requires_grad_(flag)
    report = FreezeReport("load", unchanged=[n for n, f in state.items() if before[n] == f])
    return _finish(model, report, named, before)


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters that train, each once (under its first name), in module order.

    Give these, or `weightsmith.param_groups`, to the optimizer after freezing:
    ``torch.optim.AdamW(p for _, p in trainable(model))``.

    Args:
        model: the model to read.

    Returns:
        ``(name, parameter)`` pairs with ``requires_grad=True``.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> _ = freeze_(model, "0")
    >>> [name for name, _ in trainable(model)]
    ['2.weight', '2.bias']
    """
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _set(model: nn.Module, selector: Selector | None, *, flag: bool, norm_eval: bool) -> FreezeReport:
    named = _named(model)
    picked = list(named) if selector is None else _select(model, selector)
    before = {name: p.requires_grad for name, p in named.items()}
    for name in picked:
        named[name].requires_grad_(flag)
    report = FreezeReport("unfreeze" if flag else "freeze",
                          unchanged=[n for n in picked if before[n] == flag])
    if flag or norm_eval:
        for path, module in _norms(model, selector):
            if flag and isinstance(module.__dict__.get("train"), _HeldInEval):
                del module.train  # the instance attribute; the class's train shows again
                module.train(model.training)
                report.norm_eval.append(path)
            elif not flag and not any(p.requires_grad for p in module.parameters(recurse=False)):
                if not isinstance(module.__dict__.get("train"), _HeldInEval):
                    module.train = _HeldInEval(module)
                module.train()
                report.norm_eval.append(path)
    return _finish(model, report, named, before)


class _HeldInEval:
    """Stands in for a norm layer's ``train`` method: whatever mode is asked, stay in eval.

    A class rather than a closure so that the patched module still pickles and deep-copies.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return type(self.module).train(self.module, False)


def _norms(model: nn.Module, selector: Selector | None = None) -> list[tuple[str, nn.Module]]:
    """Norm layers with running statistics, each once, that ``selector`` touches (any own tensor)."""
    matcher = None if selector is None else compile_selector(selector)
    out: dict[int, tuple[str, nn.Module]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if not (isinstance(module, _NormBase) and module.track_running_stats) or id(module) in out:
            continue
        prefix = f"{path}." if path else ""
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if matcher is None or any(matcher(prefix + n, t, module) for n, t in own):
            out[id(module)] = (path, module)
    return list(out.values())


def _named(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters(remove_duplicate=False))


def _unique(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())


def _finish(model: nn.Module, report: FreezeReport, named: dict[str, nn.Parameter],
            before: dict[str, bool]) -> FreezeReport:
    report.changed = [n for n, p in named.items() if p.requires_grad != before[n]]
    for p in _unique(model):
        if p.requires_grad:
            report.trainable_params += p.numel()
        else:
            report.frozen_params += p.numel()
    return report
