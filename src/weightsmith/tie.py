"""Find, make and break ties: several dotted names that share one Parameter object.

A tie here is Parameter *identity*: ``a.weight`` and ``b.weight`` are tied when
``model.a.weight is model.b.weight``, either because one module is used in two places or
because one module's Parameter was registered in another. Every use then adds its gradient to
the one tensor, an optimizer steps it once, and counts treat it once.

Two *different* Parameter objects that view the same storage (``nn.Parameter(p.data)``) are
not a tie: autograd keeps a separate gradient for each and an optimizer steps the memory
twice. `ties` does not report them; compare ``p.untyped_storage().data_ptr()`` to find them.
"""

from __future__ import annotations

import copy
import difflib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._result import Result
from .errors import TieError

__all__ = ["TieReport", "ties", "tie_", "untie_"]


@dataclass
class TieReport(Result):
    """What `tie_` or `untie_` did.

    Attributes:
        action: ``"tie"`` or ``"untie"``.
        tied: ``(target, source)`` pairs that now share the source's Parameter.
        untied: names that now hold a Parameter of their own.
        replaced: every name whose Parameter object changed (tied aliases of a target
            included). An optimizer built before the call still holds the old objects for
            these names: rebuild it.
        unchanged: names already in the requested state.
        skipped: parameters of a target module with no same-named parameter in the source.
        copied_modules: module paths that pointed at a module used in several places and now
            point at a copy of it (the copy shares every Parameter except the untied ones).
    """

    SCHEMA = "weightsmith.tie/1"

    action: str
    tied: list[tuple[str, str]] = field(default_factory=list)
    untied: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    copied_modules: list[str] = field(default_factory=list)

    def _rich_(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        table = Table("name", "what happened", title=f"weightsmith {self.action}", title_justify="left")
        for target, source in self.tied:
            table.add_row(target, f"now uses {source}")
        for name in self.untied:
            table.add_row(name, "has its own copy")
        for path in self.copied_modules:
            table.add_row(path, "module replaced by a copy (it was used in several places)")
        for name in self.unchanged:
            table.add_row(name, f"already {self.action}d")
        for name in self.skipped:
            table.add_row(name, "skipped: no parameter of that name in the source")
        if self.replaced:
            note = (f"{len(self.replaced)} Parameter object(s) replaced "
                    f"({', '.join(self.replaced)}): rebuild the optimizer")
        else:
            note = "no Parameter object replaced; an existing optimizer keeps working"
        return Group(table, note)


def ties(model: nn.Module, *, buffers: bool = False) -> list[tuple[str, ...]]:
    """Groups of dotted names that share one Parameter object, in module order.

    Args:
        model: the model to search.
        buffers: also report buffers shared between names (in separate groups).

    Returns:
        One tuple of names per shared tensor, each tuple in module order; untied
        parameters are left out.

    >>> lin = nn.Linear(8, 8)
    >>> ties(nn.Sequential(lin, nn.ReLU(), lin))
    [('0.weight', '2.weight'), ('0.bias', '2.bias')]
    """
    groups: dict[tuple[str, int], list[str]] = {}
    for name, tensor, kind in _walk(model, buffers=buffers):
        groups.setdefault((kind, id(tensor)), []).append(name)
    return [tuple(names) for names in groups.values() if len(names) > 1]


@torch.no_grad()
def tie_(model: nn.Module, target: str, source: str) -> TieReport:
    """Make the parameter at ``target`` be the very Parameter at ``source``.

    With two module names, every parameter of ``target`` whose relative name also exists in
    ``source`` is tied to it: ``tie_(model, "decoder", "embed")`` ties ``decoder.weight`` to
    ``embed.weight``, and lists ``decoder.bias`` (no ``embed.bias``) as skipped. The target
    then shares the source's values, dtype, device and ``requires_grad``; the Parameter that
    was at ``target`` is dropped, so an optimizer holding it must be rebuilt (see
    ``TieReport.replaced``). If the target's module is used in several places, every one of
    those places changes with it (also listed in ``replaced``).

    Args:
        model: the model to change.
        target: dotted name of the parameter (or module) that gives up its own weights.
        source: dotted name of the parameter (or module) whose Parameter is reused.

    Returns:
        A `TieReport`.

    Raises:
        TieError: a name is unknown or a buffer, a parameter is paired with a module, the
            modules have no parameter names in common, or shapes, dtypes or devices differ.
            Nothing is changed.

    >>> model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    >>> tie_(model, "1.weight", "0.weight").replaced
    ['1.weight']
    >>> model[1].weight is model[0].weight
    True
    """
    problems: list[str] = []
    kinds = {name: _kind(model, name) for name in (target, source)}
    for name, kind in kinds.items():
        if kind == "missing":
            problems.append(_unknown(model, name))
        elif kind == "buffer":
            problems.append(f"{name!r} is a buffer; tie_ ties parameters")
    pairs: list[tuple[str, str]] = []
    skipped: list[str] = []
    if not problems:
        if kinds[target] != kinds[source]:
            problems.append(f"cannot tie {kinds[target]} {target!r} to {kinds[source]} {source!r}: "
                            "give two parameter names or two module names")
        elif kinds[target] == "parameter":
            pairs = [(target, source)]
        else:
            pairs, skipped, problem = _module_pairs(model, target, source)
            problems += [problem] if problem else []
    sources = {s: model.get_parameter(s) for _, s in pairs}
    for t, s in pairs:
        old, new = model.get_parameter(t), sources[s]
        for what, a, b in (("shape", old.shape, new.shape), ("dtype", old.dtype, new.dtype),
                           ("device", old.device, new.device)):
            if a != b:
                problems.append(f"{what} mismatch: {t} is {_fmt(a)}, {s} is {_fmt(b)}")
    if problems:
        raise TieError("cannot tie: " + "; ".join(problems) + ". Nothing was changed.")

    before = _param_ids(model)
    report = TieReport("tie", skipped=skipped)
    for t, s in pairs:
        owner, short = _owner(model, t)
        if owner._parameters[short] is sources[s]:
            report.unchanged.append(t)
        else:
            setattr(owner, short, sources[s])
            report.tied.append((t, s))
    report.replaced = _changed(before, _param_ids(model))
    return report


@torch.no_grad()
def untie_(model: nn.Module, names: str | Iterable[str]) -> TieReport:
    """Give each named parameter a Parameter of its own (same values and ``requires_grad``).

    A module name stands for all its parameters. Names that are not tied are left alone
    (``unchanged``). When every name of a tie group is given, the first one in module order
    keeps the original Parameter, so the fewest objects change. When a name lives in a module
    used in several places (``nn.Sequential(lin, act, lin)``), that place is first pointed at
    a copy of the module sharing every other Parameter (``copied_modules``).

    Args:
        model: the model to change.
        names: one dotted parameter or module name, or several.

    Returns:
        A `TieReport`; ``replaced`` names need a rebuilt optimizer.

    Raises:
        TieError: a name is unknown or a buffer. Nothing is changed.

    >>> lin = nn.Linear(8, 8)
    >>> model = nn.Sequential(lin, nn.ReLU(), lin)
    >>> untie_(model, "2").copied_modules
    ['2']
    >>> model[2].weight is model[0].weight
    False
    """
    wanted = _expand(model, [names] if isinstance(names, str) else list(names))
    groups = {name: group for group in ties(model) for name in group}
    report = TieReport("untie")
    todo: list[str] = []
    for name in wanted:
        group = groups.get(name)
        if group is None:
            report.unchanged.append(name)
            continue
        report.untied.append(name)
        if not (set(group) <= set(wanted) and name == group[0]):
            todo.append(name)  # a fully named group keeps its original at its first name
    before = _param_ids(model)
    for name in todo:
        owner, short, copied = _unshared_owner(model, name)
        report.copied_modules += copied
        param = owner._parameters[short]
        setattr(owner, short, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
    report.replaced = _changed(before, _param_ids(model))
    return report


def _walk(model: nn.Module, *, buffers: bool) -> Iterator[tuple[str, torch.Tensor, str]]:
    # remove_duplicate=False: a module used twice must show both of its names
    for path, module in model.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for short, param in module.named_parameters(recurse=False, remove_duplicate=False):
            yield prefix + short, param, "parameter"
        if buffers:
            for short, buf in module.named_buffers(recurse=False, remove_duplicate=False):
                yield prefix + short, buf, "buffer"


def _param_ids(model: nn.Module) -> dict[str, int]:
    return {name: id(p) for name, p, _ in _walk(model, buffers=False)}


def _changed(before: dict[str, int], after: dict[str, int]) -> list[str]:
    return [name for name, ident in after.items() if before.get(name, ident) != ident]


def _kind(model: nn.Module, name: str) -> str:
    """``"parameter"``, ``"buffer"``, ``"module"`` or ``"missing"``."""
    if not name:
        return "missing"  # the root itself cannot be tied
    path, _, short = name.rpartition(".")
    try:
        owner = model.get_submodule(path)
    except AttributeError:
        return "missing"
    if owner._parameters.get(short) is not None:
        return "parameter"
    if owner._buffers.get(short) is not None:
        return "buffer"
    return "module" if isinstance(owner._modules.get(short), nn.Module) else "missing"


def _unknown(model: nn.Module, name: str) -> str:
    known = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    known += [n for n, _, _ in _walk(model, buffers=False)]
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"no parameter or module named {name!r}{hint}"


def _module_pairs(model: nn.Module, target: str, source: str) -> tuple[list[tuple[str, str]], list[str], str]:
    src = {n for n, _ in model.get_submodule(source).named_parameters(remove_duplicate=False)}
    tgt = [n for n, _ in model.get_submodule(target).named_parameters(remove_duplicate=False)]
    pairs = [(f"{target}.{n}", f"{source}.{n}") for n in tgt if n in src]
    skipped = [f"{target}.{n}" for n in tgt if n not in src]
    problem = "" if pairs else (f"modules {target!r} ({', '.join(tgt) or 'no parameters'}) and "
                                f"{source!r} ({', '.join(sorted(src)) or 'no parameters'}) "
                                "have no parameter names in common")
    return pairs, skipped, problem


def _expand(model: nn.Module, names: list[str]) -> list[str]:
    problems: list[str] = []
    out: list[str] = []
    for name in names:
        kind = _kind(model, name) if isinstance(name, str) else "missing"
        if kind == "parameter":
            out.append(name)
        elif kind == "module":
            out += [f"{name}.{n}" for n, _ in model.get_submodule(name).named_parameters(remove_duplicate=False)]
        elif kind == "buffer":
            problems.append(f"{name!r} is a buffer; untie_ unties parameters")
        else:
            problems.append(_unknown(model, str(name)))
    if problems:
        raise TieError("cannot untie: " + "; ".join(problems) + ". Nothing was changed.")
    return list(dict.fromkeys(out))


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, short = name.rpartition(".")
    return model.get_submodule(path), short


def _unshared_owner(model: nn.Module, name: str) -> tuple[nn.Module, str, list[str]]:
    """The module holding ``name``, after copying any module on its path used in several places."""
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    path, _, short = name.rpartition(".")
    module, copied, walked = model, [], []
    for seg in path.split(".") if path else []:
        child = module._modules[seg]
        walked.append(seg)
        if uses[id(child)] > 1:
            child = _copy_sharing_tensors(child)
            setattr(module, seg, child)
            copied.append(".".join(walked))
            uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        module = child
    return module, short, copied


def _copy_sharing_tensors(module: nn.Module) -> nn.Module:
    # deepcopy consults the memo first, so pre-seeding it with every parameter and buffer
    # copies the module structure while keeping the very same tensors in it
    memo: dict[int, Any] = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def _fmt(value: Any) -> str:
    return str(list(value)) if isinstance(value, torch.Size) else str(value)
