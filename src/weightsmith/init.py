"""Initialize parameters by rules: ordered (selector, initializer) pairs, the first match wins.

An initializer is a name from `INITIALIZERS` with literal arguments, written as text
(``"kaiming_normal(mode='fan_out', nonlinearity='relu')"``), a callable changing a tensor in
place, or a mapping from the parameter's last name segment to either (``{"weight": "ones",
"bias": "zeros"}``), which lets a module-type selector treat weights and biases apart.
Text is parsed with `ast`, never evaluated.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from . import selectors
from ._result import Result
from ._slots import Slot, materialize, registrations, slots_of
from .errors import ModelError, SelectorError
from .selectors import Matcher, Selector, compile_selector

__all__ = ["InitEntry", "InitReport", "init_", "INITIALIZERS", "DEFAULT_RULES"]

Initializer = Union[str, Callable[[torch.Tensor], Any]]
Rules = Union[str, Sequence[tuple[Selector, Union[Initializer, Mapping[str, Initializer]]]],
              Mapping[Any, Union[Initializer, Mapping[str, Initializer]]]]


def _sparse_(tensor: torch.Tensor, sparsity: float, std: float = 0.01,
             generator: torch.Generator | None = None) -> torch.Tensor:
    # nn.init.sparse_ draws its row permutations from the global RNG even when given a
    # generator, which would break seeded reproducibility; this draws everything from ``generator``.
    if tensor.ndim != 2:
        raise ValueError("Only tensors with 2 dimensions are supported")
    if tensor.is_meta:
        return tensor
    rows, cols = tensor.shape
    num_zeros = math.ceil(sparsity * rows)
    tensor.normal_(0, std, generator=generator)
    if num_zeros:
        order = torch.rand(rows, cols, generator=generator, device=tensor.device).argsort(dim=0)
        tensor.scatter_(0, order[:num_zeros], 0.0)  # a random set of rows per column
    return tensor


INITIALIZERS: dict[str, Callable[..., Any]] = {
    "normal": nn.init.normal_,
    "uniform": nn.init.uniform_,
    "constant": nn.init.constant_,
    "zeros": nn.init.zeros_,
    "ones": nn.init.ones_,
    "xavier_normal": nn.init.xavier_normal_,
    "xavier_uniform": nn.init.xavier_uniform_,
    "kaiming_normal": nn.init.kaiming_normal_,
    "kaiming_uniform": nn.init.kaiming_uniform_,
    "orthogonal": nn.init.orthogonal_,
    "sparse": _sparse_,
    "trunc_normal": nn.init.trunc_normal_,
    "eye": nn.init.eye_,
    "dirac": nn.init.dirac_,
}

DEFAULT_RULES: tuple[tuple[Selector, Mapping[str, str]], ...] = (
    (nn.Linear, {"weight": "xavier_uniform", "bias": "zeros"}),
    (nn.modules.conv._ConvNd,  # Conv1d/2d/3d and their transposes
     {"weight": "kaiming_normal(mode='fan_out', nonlinearity='relu')", "bias": "zeros"}),
    ([nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm],  # _NormBase: Batch/InstanceNorm
     {"weight": "ones", "bias": "zeros"}),
    (nn.Embedding, {"weight": "normal(std=0.02)"}),
)


@dataclass(frozen=True)
class InitEntry:
    """One initialized tensor: its (first) name, shape, the initializer it got, and its tied names."""

    name: str
    shape: tuple[int, ...]
    initializer: str
    tied: tuple[str, ...] = ()


@dataclass(frozen=True)
class InitReport(Result):
    """What `init_` did to each parameter.

    Attributes:
        entries: the initialized tensors, in model order (a tied tensor once, with its other names).
        untouched: parameters no rule matched, left as they were.
        skipped: parameters excluded by ``skip=``.
        materialized: parameters moved off the meta device before being initialized.
        still_meta: parameters and buffers still on the meta device afterwards (they hold no values).
        seed: the seed used, or ``None`` for the global random state.
    """

    SCHEMA = "weightsmith.init/1"

    entries: tuple[InitEntry, ...]
    untouched: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    materialized: tuple[str, ...] = ()
    still_meta: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def initializers(self) -> dict[str, str]:
        """Every initialized name, tied ones included, → the initializer text it got."""
        return {name: e.initializer for e in self.entries for name in (e.name, *e.tied)}

    def _rich_(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        summary = (f"{len(self.entries)} initialized, {len(self.untouched)} untouched, "
                   f"{len(self.skipped)} skipped" + ("" if self.seed is None else f" (seed {self.seed})"))
        table = Table()
        table.add_column("parameter")
        table.add_column("shape")
        table.add_column("initializer")
        for e in self.entries:
            tied = f" (also {', '.join(e.tied)})" if e.tied else ""
            table.add_row(e.name + tied, str(e.shape), e.initializer)
        for name in self.untouched:
            table.add_row(name, "", "untouched: no rule matched")
        for name in self.skipped:
            table.add_row(name, "", "skipped")
        return Group(Text(summary), table)


@dataclass(frozen=True)
class _Init:
    """A parsed initializer, ready to check on a meta tensor and to apply."""

    text: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    named: bool = True  # False for a user's callable
    takes_generator: bool = False

    def check(self, shape: torch.Size, dtype: torch.dtype) -> None:
        """Run on an empty meta tensor: wrong ranks or argument values raise, no values are drawn."""
        if self.named:
            self.fn(torch.empty(shape, dtype=dtype, device="meta"), *self.args, **self.kwargs)

    def apply(self, tensor: torch.Tensor, seed: int | None) -> None:
        if self.named:
            if seed is not None and self.takes_generator:
                generator = torch.Generator(device=tensor.device)
                generator.manual_seed(seed)
                self.fn(tensor, *self.args, generator=generator, **self.kwargs)
            else:
                self.fn(tensor, *self.args, **self.kwargs)
            return
        if seed is None:
            out = self.fn(tensor)
        else:
            out = _call_seeded(self.fn, tensor, seed)
        if isinstance(out, torch.Tensor) and out is not tensor:
            # ``lambda t: torch.zeros_like(t)`` would otherwise be silently ignored
            if out.shape != tensor.shape:
                raise ModelError(f"initializer {self.text} returned shape {tuple(out.shape)}, "
                                 f"expected {tuple(tensor.shape)}")
            tensor.copy_(out)


def _call_seeded(fn: Callable[[torch.Tensor], Any], tensor: torch.Tensor, seed: int) -> Any:
    """Call ``fn`` with the global generator of the tensor's device seeded, then put it back."""
    cuda = tensor.device.type == "cuda"
    index = 0
    if cuda:
        index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        return fn(tensor)


def _derive_seed(seed: int, name: str) -> int:
    # a stable hash of (seed, name): results do not depend on the order parameters are visited
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _parse(spec: Any, problems: list[str], where: str) -> _Init | None:
    """Turn ``"name(literal args)"`` or a callable into an `_Init`; record problems instead of raising."""
    if callable(spec) and not isinstance(spec, str):
        return _Init(getattr(spec, "__name__", repr(spec)), spec, named=False)
    if not isinstance(spec, str):
        problems.append(f"{where}: an initializer is a name like 'normal(std=0.02)' or a callable, "
                        f"not {type(spec).__name__}")
        return None
    known = ", ".join(INITIALIZERS)
    try:
        node = ast.parse(spec.strip(), mode="eval").body
        if isinstance(node, ast.Name):
            name, args, kwargs = node.id, (), {}
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if any(k.arg is None for k in node.keywords):
                raise ValueError("'**' arguments are not allowed")
            name = node.func.id
            args = tuple(ast.literal_eval(a) for a in node.args)
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        else:
            raise ValueError("expected a name with optional literal arguments")
    except (SyntaxError, ValueError, TypeError) as e:
        problems.append(f"{where}: cannot read initializer {spec!r} ({e}); write e.g. 'normal(std=0.02)'")
        return None
    fn = INITIALIZERS.get(name.removesuffix("_"))
    if fn is None:
        problems.append(f"{where}: unknown initializer {name!r}; known: {known}")
        return None
    if "generator" in kwargs:
        problems.append(f"{where}: {spec!r}: pass seed= to init_ rather than a generator")
        return None
    signature = inspect.signature(fn)
    try:
        signature.bind(None, *args, **kwargs)
    except TypeError as e:
        problems.append(f"{where}: {spec!r}: {e}")
        return None
    return _Init(spec.strip(), fn, args, kwargs, takes_generator="generator" in signature.parameters)


@dataclass(frozen=True)
class _Rule:
    matcher: Matcher
    init: _Init | dict[str, _Init]
    checked: bool  # a user's rule must match something; the default preset's need not


def _compile_rules(rules: Rules) -> list[_Rule]:
    checked = True
    if isinstance(rules, str):
        if rules != "default":
            raise ModelError(f"unknown rule preset {rules!r}; the preset is 'default', or give "
                             "(selector, initializer) pairs")
        rules, checked = DEFAULT_RULES, False
    pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    problems: list[str] = []
    compiled: list[_Rule] = []
    for i, rule in enumerate(pairs):
        where = f"rule {i}"
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            problems.append(f"{where}: expected a (selector, initializer) pair, got {rule!r}")
            continue
        selector, spec = rule
        matcher = compile_selector(selector)
        where = f"rule {i} ({matcher.text})"
        if isinstance(spec, Mapping):
            parsed = {leaf: _parse(s, problems, f"{where}[{leaf!r}]") for leaf, s in spec.items()}
            init: _Init | dict[str, _Init] | None = (
                None if None in parsed.values() else {k: v for k, v in parsed.items() if v is not None}
            )
        else:
            init = _parse(spec, problems, where)
        if init is not None:
            compiled.append(_Rule(matcher, init, checked))
    if problems:
        raise ModelError("cannot use these init rules:\n" + "\n".join(f"  - {p}" for p in problems))
    return compiled


def _is_empty(selector: Any) -> bool:
    return selector is None or (isinstance(selector, (list, tuple, set, frozenset)) and not selector)


def _choose(rules: list[_Rule], picked: list[set[str]], names: tuple[str, ...]) -> _Init | None:
    """The first rule matching any name of this tensor (all its names, when tied)."""
    for rule, hits in zip(rules, picked):
        for name in names:
            if name not in hits:
                continue
            if isinstance(rule.init, _Init):
                return rule.init
            leaf_init = rule.init.get(name.rsplit(".", 1)[-1])
            if leaf_init is not None:
                return leaf_init
    return None


def _unused_rules(rules: list[_Rule], picked: list[set[str]]) -> list[str]:
    unused = []
    for i, (rule, hits) in enumerate(zip(rules, picked)):
        if not rule.checked:
            continue
        if not hits:
            unused.append(f"rule {i} ({rule.matcher.text}) matches no parameter")
        elif isinstance(rule.init, dict):
            leaves = {n.rsplit(".", 1)[-1] for n in hits}
            unused += [f"rule {i} ({rule.matcher.text}): no parameter it matches is called {leaf!r}"
                       for leaf in rule.init if leaf not in leaves]
    return unused


def _padding_row(model: nn.Module, names: tuple[str, ...]) -> int | None:
    """The ``padding_idx`` of an Embedding (or EmbeddingBag) whose weight has one of ``names``."""
    for name in names:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if leaf == "weight" and isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.padding_idx is not None:
            return module.padding_idx
    return None


def init_(
    model: nn.Module,
    rules: Rules,
    *,
    seed: int | None = None,
    skip: Selector | None = (),
    device: str | torch.device | None = None,
) -> InitReport:
    """Initialize parameters in place by ordered rules; the first rule matching a parameter wins.

    Rules are ``(selector, initializer)`` pairs (or a dict of them), or the preset ``"default"``:
    Linear → xavier uniform weight, zero bias; Conv → kaiming normal (fan_out, relu), zero bias;
    BatchNorm/GroupNorm/LayerNorm (and InstanceNorm, RMSNorm) → weight 1, bias 0; Embedding →
    normal(std=0.02). Initializers are the names in `INITIALIZERS` with literal arguments, e.g.
    ``"trunc_normal(std=0.02)"``, or callables ``fn(tensor)`` changing the tensor in place.

    Every rule and every (parameter, initializer) pair is checked before any value is written.
    A tied tensor is initialized once. The ``padding_idx`` row of an Embedding's weight is
    zeroed after whatever initializer it got, as ``nn.Embedding`` itself does. Parameters on the
    meta device are first replaced by Parameters on ``device`` (same ``requires_grad``, ties kept).

    Args:
        model: the live model.
        rules: the rules, or ``"default"``.
        seed: seed each parameter's generator from ``(seed, name)``: results do not depend on
            the order of parameters or rules, and the global random state is left unchanged.
        skip: parameters to leave alone, whatever the rules say.
        device: where to materialize parameters that are on the meta device.

    Returns:
        An `InitReport`: the initializer each parameter got, and the parameters left untouched.

    Raises:
        ModelError: an initializer is unknown or malformed, does not fit a parameter (e.g. xavier
            on a 1-D bias), or a meta parameter needs ``device=``.
        SelectorError: a selector is malformed, or a rule or ``skip`` matches nothing.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> report = init_(model, [("*.bias", "zeros"), ("*.weight", "normal(std=0.02)")], seed=0)
    >>> report.initializers["2.bias"]
    'zeros'
    """
    compiled = _compile_rules(rules)
    picked = [set(selectors.select(model, r.matcher, allow_empty=True)) for r in compiled]
    skipped_names = set() if _is_empty(skip) else set(selectors.select(model, skip))  # type: ignore[arg-type]
    unused = _unused_rules(compiled, picked)
    if unused:
        raise SelectorError("every rule must match something; drop or fix these:\n"
                            + "\n".join(f"  - {u}" for u in unused))

    slots = list({id(s.tensor): s for s in slots_of(model, buffers=False).values()}.values())
    plan: list[tuple[Slot, _Init]] = []
    untouched: list[str] = []
    skipped: list[str] = []
    problems: list[str] = []
    checked: dict[tuple[int, torch.Size, torch.dtype], str | None] = {}
    for slot in slots:
        if skipped_names.intersection(slot.names):
            skipped += slot.names
            continue
        chosen = _choose(compiled, picked, slot.names)
        if chosen is None:
            untouched += slot.names
            continue
        name, tensor = slot.names[0], slot.tensor
        if tensor.is_meta and device is None:
            problems.append(f"{name!r} is on the meta device: pass device= to materialize it")
        key = (id(chosen), tensor.shape, tensor.dtype)  # layers repeat: check each kind once
        if key not in checked:
            try:
                chosen.check(tensor.shape, tensor.dtype)
                checked[key] = None
            except Exception as e:  # the initializer's own message says what does not fit
                checked[key] = str(e)
        if checked[key] is not None:
            problems.append(f"{name!r} {tuple(tensor.shape)}: {chosen.text} does not fit it ({checked[key]})")
        plan.append((slot, chosen))
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ModelError(f"cannot initialize; nothing was changed:\n{lines}")

    to_materialize = [slot for slot, _ in plan if slot.tensor.is_meta]
    regs = registrations(model) if to_materialize else {}
    replaced = {id(slot.tensor): materialize(regs, slot.tensor, torch.device(device)) for slot in to_materialize}
    entries: list[InitEntry] = []
    with torch.no_grad():
        for slot, chosen in plan:
            tensor = replaced.get(id(slot.tensor), slot.tensor)
            chosen.apply(tensor, None if seed is None else _derive_seed(seed, slot.names[0]))
            text = chosen.text
            padding = _padding_row(model, slot.names)
            if padding is not None:  # as nn.Embedding's own init does: the padding vector stays zero
                tensor[padding].zero_()
                text += f"; padding row {padding} zeroed"
            entries.append(InitEntry(slot.names[0], tuple(tensor.shape), text, slot.names[1:]))
    any_meta = any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    still_meta = [n for n, s in slots_of(model).items() if s.tensor.is_meta] if any_meta else []
    return InitReport(
        tuple(entries), tuple(untouched), tuple(skipped),
        tuple(n for slot in to_materialize for n in slot.names), tuple(still_meta), seed,
    )
