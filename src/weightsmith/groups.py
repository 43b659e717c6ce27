"""Optimizer parameter groups: learning rate and weight decay per parameter, by rule.

`param_groups` returns a list of dicts that any ``torch.optim`` optimizer takes as is::

    opt = torch.optim.AdamW(param_groups(model, lr=1e-4, weight_decay=0.05,
                                         rules=[("head", {"lr": 1e-3})], layer_decay=0.75))

Each dict carries ``"params"``, ``"param_names"``, ``"lr"`` and ``"weight_decay"``. Because
the groups carry names, a group added later with ``optimizer.add_param_group`` needs
``"param_names"`` too (torch refuses to mix named and unnamed groups).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from torch import nn
from torch.nn.modules.batchnorm import _NormBase  # BatchNorm*, SyncBatchNorm, InstanceNorm*

from ._result import Result
from .errors import ModelError, SelectorError
from .selectors import Selector, select

__all__ = ["ParamGroups", "GroupsReport", "GroupInfo", "param_groups"]

Rules = Union[Sequence[tuple[Selector, Mapping[str, float]]], Mapping[Any, Mapping[str, float]]]

_OPTIONS = ("lr", "lr_mult", "weight_decay")
_NORMS = (_NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
# the first index after one of these containers is the layer number: layers.3, blocks.3, h.3
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|blocks|block|h)\.(\d+)(?:\.|$)")
_SAMPLE = 3  # names a rendered group shows


@dataclass
class GroupInfo:
    """One group as `ParamGroups.explain` shows it."""

    lr: float
    weight_decay: float
    tensors: int
    elements: int
    names: list[str] = field(default_factory=list)


@dataclass
class GroupsReport(Result):
    """The groups of a `ParamGroups`: options, sizes and names.

    Attributes:
        groups: one `GroupInfo` per optimizer group, in order.
    """

    SCHEMA = "weightsmith.param_groups/1"

    groups: list[GroupInfo] = field(default_factory=list)

    def _rich_(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        table = Table("group", "lr", "weight_decay", "tensors", "elements", "names",
                      title="weightsmith param_groups", title_justify="left")
        for i, g in enumerate(self.groups):
            names = ", ".join(g.names[:_SAMPLE])
            if len(g.names) > _SAMPLE:
                names += f", … (+{len(g.names) - _SAMPLE})"
            table.add_row(str(i), f"{g.lr:.3g}", f"{g.weight_decay:.3g}", str(g.tensors),
                          f"{g.elements:,}", names)
        return Group(table, f"{sum(g.tensors for g in self.groups)} trainable tensors in "
                            f"{len(self.groups)} groups; frozen parameters left out")


class ParamGroups(list):  # type: ignore[type-arg]
    """A list of optimizer group dicts; pass it straight to ``torch.optim.AdamW(...)``."""

    def explain(self) -> GroupsReport:
        """A printable summary: per group its lr, weight decay, size and names."""
        return GroupsReport([
            GroupInfo(lr=g["lr"], weight_decay=g["weight_decay"], tensors=len(g["params"]),
                      elements=sum(p.numel() for p in g["params"]), names=list(g["param_names"]))
            for g in self
        ])

    def __rich__(self) -> Any:
        return self.explain()._rich_()

    def __str__(self) -> str:
        return str(self.explain())

    def __repr__(self) -> str:
        return f"ParamGroups({len(self)} groups, {sum(len(g['params']) for g in self)} tensors)"


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    rules: Rules = (),
    no_decay: Selector | str | None = "auto",
    no_decay_embeddings: bool = False,
    layer_decay: float | None = None,
    layer_id: Callable[[str], int] | None = None,
) -> ParamGroups:
    """Group the trainable parameters by learning rate and weight decay.

    Every trainable parameter lands in exactly one group (a tied one once, under its first
    name); frozen ones are left out; groups with equal options are merged.

    Args:
        model: the model whose parameters to group.
        lr: the base learning rate.
        weight_decay: the base weight decay.
        rules: ordered ``(selector, options)`` pairs (or a dict); the first rule matching any
            name of a parameter applies. Options: ``lr`` (absolute, replaces the layer-decayed
            rate), ``lr_mult`` (multiplies the layer-decayed rate), ``weight_decay``.
        no_decay: parameters that get no weight decay, whatever the rules say. ``"auto"``:
            biases, parameters of norm layers and every tensor with fewer than two dimensions.
            Or a selector, or None for none.
        no_decay_embeddings: also exclude ``nn.Embedding``/``nn.EmbeddingBag`` weights.
        layer_decay: layer-wise decay ``d``: a parameter of layer ``i`` gets
            ``lr * d ** (top - i)``. Layers are found in names (``layers.N``, ``layer.N``,
            ``blocks.N``, ``h.N``; the first such index), with ``L`` layers: ``layers.N`` is
            layer ``N + 1``, parameters before the first layer in module order (embeddings)
            are layer 0, the others (final norm, head) are layer ``top = L + 1`` and keep
            ``lr``. With ``L = 4`` and ``d = 0.5``: ``layers.3`` gets ``lr / 2``,
            ``layers.0`` ``lr / 16``, the embeddings ``lr / 32``.
        layer_id: with ``layer_decay``, a function ``name -> layer id`` used instead of the
            names; ``top`` is then the highest id it returns.

    Returns:
        A `ParamGroups` list; ``.explain()`` renders it as a table.

    Raises:
        SelectorError: a rule or ``no_decay`` selector is malformed or matches nothing.
        ModelError: bad options, no trainable parameters, or no layers found for ``layer_decay``.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> groups = param_groups(model, lr=1e-3, weight_decay=0.1, rules=[("2", {"lr_mult": 10})])
    >>> [(g["param_names"], g["lr"], g["weight_decay"]) for g in groups]
    [(['0.weight'], 0.001, 0.1), (['0.bias'], 0.001, 0.0), (['2.weight'], 0.01, 0.1), (['2.bias'], 0.01, 0.0)]
    """
    rule_list = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    problems = _check_options(lr, weight_decay, rule_list, layer_decay, layer_id)
    selector_problems: list[str] = []
    rule_hits = [_hits(model, rule[0], f"rule {_text(rule[0])}", selector_problems) if _is_rule(rule) else set()
                 for rule in rule_list]
    if no_decay == "auto":
        decay_off = _auto_no_decay(model)
    else:
        decay_off = set() if no_decay is None else _hits(model, no_decay, "no_decay", selector_problems)
    if no_decay_embeddings:
        decay_off |= {n for n, _, owner in _entries(model) if isinstance(owner, _EMBEDDINGS)}

    entries = _unique_entries(model)
    train = [(names, p) for names, p in entries if p.requires_grad]
    if not train:
        problems.append("no trainable parameters (every one has requires_grad=False); unfreeze some first")
    layer_scale: dict[str, float] = {}
    if layer_decay is not None and not problems:
        layer_scale, problem = _layer_scales([names[0] for names, _ in entries], layer_decay, layer_id)
        problems += [problem] if problem else []
    if problems or selector_problems:
        error = SelectorError if not problems else ModelError
        raise error("cannot build param groups: " + "; ".join(problems + selector_problems))

    merged: dict[tuple[float, float], dict[str, Any]] = {}
    for names, param in train:
        options = next((opts for (_, opts), hits in zip(rule_list, rule_hits) if hits & set(names)), {})
        base = lr * layer_scale.get(names[0], 1.0)
        group_lr = float(options["lr"]) if "lr" in options else base * float(options.get("lr_mult", 1.0))
        group_wd = 0.0 if decay_off & set(names) else float(options.get("weight_decay", weight_decay))
        group = merged.setdefault((group_lr, group_wd), {"params": [], "param_names": [],
                                                         "lr": group_lr, "weight_decay": group_wd})
        group["params"].append(param)
        group["param_names"].append(names[0])
    return ParamGroups(merged.values())


def _check_options(lr: Any, weight_decay: Any, rules: list[Any], layer_decay: Any, layer_id: Any) -> list[str]:
    problems = []
    for what, value in (("lr", lr), ("weight_decay", weight_decay)):
        if not _nonneg(value):
            problems.append(f"{what} must be a finite number >= 0, got {value!r}")
    for i, rule in enumerate(rules):
        if not _is_rule(rule):
            problems.append(f"rule {i} must be a (selector, options dict) pair, got {rule!r}")
            continue
        options = rule[1]
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            problems.append(f"rule {_text(rule[0])}: unknown options {unknown} (use {', '.join(_OPTIONS)})")
        if "lr" in options and "lr_mult" in options:
            problems.append(f"rule {_text(rule[0])}: give lr or lr_mult, not both")
        problems += [f"rule {_text(rule[0])}: {k} must be a finite number >= 0, got {v!r}"
                     for k, v in options.items() if k in _OPTIONS and not _nonneg(v)]
    if not (layer_decay is None or (_nonneg(layer_decay) and layer_decay > 0)):
        problems.append(f"layer_decay must be a number > 0, got {layer_decay!r}")
    if layer_id is not None and (layer_decay is None or not callable(layer_id)):
        problems.append("layer_id must be a function name -> layer id, given with layer_decay")
    return problems


def _is_rule(rule: Any) -> bool:
    return isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[1], Mapping)


def _hits(model: nn.Module, selector: Selector, what: str, problems: list[str]) -> set[str]:
    try:
        return set(select(model, selector))
    except SelectorError as e:
        problems.append(f"{what}: {e}")
        return set()


def _nonneg(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _text(selector: Any) -> str:
    return repr(selector) if isinstance(selector, str) else getattr(selector, "__name__", repr(selector))


def _entries(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Module]]:
    """Every (name, parameter, owning module), tied aliases included, in module order."""
    out = []
    for path, module in model.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        out += [(prefix + n, p, module) for n, p in module.named_parameters(recurse=False, remove_duplicate=False)]
    return out


def _unique_entries(model: nn.Module) -> list[tuple[tuple[str, ...], nn.Parameter]]:
    """Each parameter once, with all its names (first name first), in module order."""
    by_id: dict[int, tuple[list[str], nn.Parameter]] = {}
    for name, param, _ in _entries(model):
        by_id.setdefault(id(param), ([], param))[0].append(name)
    return [(tuple(names), p) for names, p in by_id.values()]


def _auto_no_decay(model: nn.Module) -> set[str]:
    return {name for name, p, owner in _entries(model)
            if name.rpartition(".")[2] == "bias" or isinstance(owner, _NORMS) or p.ndim <= 1}


def _layer_scales(names: list[str], decay: float,
                  layer_id: Callable[[str], int] | None) -> tuple[dict[str, float], str]:
    """``{name: decay ** (top - id)}``, or a problem when layer ids cannot be found."""
    if layer_id is not None:
        ids = {n: layer_id(n) for n in names}
        bad = [f"{n} -> {i!r}" for n, i in ids.items() if not isinstance(i, int) or isinstance(i, bool)]
        if bad:
            return {}, "layer_id must return an int for every name, got " + ", ".join(bad[:5])
        top = max(ids.values())
    else:
        found = {n: int(m.group(1)) for n in names if (m := _LAYER.search(n))}
        if not found:
            return {}, ("layer_decay found no numbered layers (layers.N, layer.N, blocks.N, h.N) "
                        "in the parameter names; pass layer_id=function(name) -> layer id")
        top = max(found.values()) + 2
        ids, seen_layer = {}, False
        for n in names:  # module order: before the first layer is 0, after it is the top
            seen_layer |= n in found
            ids[n] = found[n] + 1 if n in found else (top if seen_layer else 0)
    return {n: decay ** (top - i) for n, i in ids.items()}, ""
