"""Safe, all-or-nothing writes into a live model.

Every entry is checked before anything is written (name, shape, dtype), then values are copied
in place with ``tensor.copy_`` under ``no_grad``: each Parameter object stays the same one, so an
optimizer holding it keeps working, and a tie (one tensor under several names) stays a tie.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._result import Result
from . import selectors
from ._slots import Write, check_writes, refuse, slots_of, write_all
from .errors import AssignError
from .selectors import Selector

__all__ = ["AssignReport", "assign_", "update_"]


@dataclass(frozen=True)
class AssignReport(Result):
    """What `assign_`, `update_` or `restore_` wrote.

    Attributes:
        written: the names whose values were given and written, in the order given.
        through_ties: names not given that changed because they share a tensor with a written name.
        skipped: ``(name, reason)`` for entries left alone (unknown names with ``strict=False``).
    """

    SCHEMA = "weightsmith.assign/1"

    written: tuple[str, ...]
    through_ties: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()

    def _rich_(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        summary = f"{len(self.written)} written, {len(self.skipped)} skipped"
        table = Table()
        table.add_column("name")
        table.add_column("result")
        for name in self.written:
            table.add_row(name, "written")
        for name in self.through_ties:
            table.add_row(name, "written (tied)")
        for name, reason in self.skipped:
            table.add_row(name, f"skipped: {reason}")
        return Group(Text(summary), table)


def writes_report(writes: list[Write], skipped: list[tuple[str, str]]) -> AssignReport:
    given = [n for w in writes for n in w.given]
    given_set = set(given)
    tied = [n for w in writes for n in w.slot.names if n not in given_set]
    return AssignReport(tuple(given), tuple(tied), tuple(skipped))


def assign_(model: nn.Module, mapping: Mapping[str, Any], *, strict: bool = True) -> AssignReport:
    """Write new values into parameters and buffers, checked first, all or nothing.

    Every entry is checked before anything is written: the name exists, the shape is equal and the
    dtype casts without losing values (integer → float is fine; float → integer and complex → real
    are not). Values land on each tensor's own device and dtype, and each Parameter object stays
    the same (an optimizer holding it keeps working). Names the mapping leaves out are not touched.
    Writing one name of a tied group writes the shared tensor. Values that share memory with the
    model (``{"a": m.b, "b": m.a}``) are read before anything is written; targets that cannot
    take a value in place (expanded, sparse, read-only memory) and different tensors over one
    memory given disagreeing values are refused; tensors made under ``torch.inference_mode()``
    are written under it.

    Args:
        model: the live model.
        mapping: dotted name → tensor (or anything ``torch.as_tensor`` accepts).
        strict: names the model does not have are errors; with ``False`` they are skipped and
            reported.

    Returns:
        An `AssignReport` of what was written, written through ties, and skipped.

    Raises:
        AssignError: listing every problem (name, expected vs given shape or dtype); the model is
            unchanged. A write failing midway restores every entry written before it.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> assign_(model, {"2.bias": torch.tensor([0.5])}).written
    ('2.bias',)
    """
    writes, skipped, problems = check_writes(model, mapping, strict=strict)
    if problems:
        refuse(problems, len(mapping))
    with torch.no_grad():
        write_all(writes)
    return writes_report(writes, skipped)


def update_(
    model: nn.Module,
    fn: Callable[[torch.Tensor], torch.Tensor | None],
    *,
    select: Selector | None = None,
    buffers: bool = False,
) -> AssignReport:
    """Change selected parameters through a function, checked and written like `assign_`.

    ``fn`` receives a detached copy of each selected tensor (once per tied group). It may return a
    new tensor of the same shape, or change its argument in place and return ``None``; either way
    the result is checked and then written into the model's own tensor. Rebinding a name — the
    classic ``param = torch.zeros(...)`` that silently does nothing — cannot happen here.
    Nothing is written unless ``fn`` succeeds and every result fits.

    Args:
        model: the live model.
        fn: ``fn(tensor) -> Tensor | None``.
        select: which tensors (see `weightsmith.selectors`); every parameter by default.
        buffers: also offer buffers to ``select`` (and change them when selected).

    Returns:
        An `AssignReport`; ``written`` names one name per tied group.

    Raises:
        AssignError: ``fn`` raised or returned something that does not fit; the model is unchanged.
        SelectorError: ``select`` matched nothing.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> report = update_(model, lambda t: t * 0.5, select=lambda name, t: t.ndim > 1)
    >>> report.written
    ('0.weight', '2.weight')
    """
    slots = slots_of(model, buffers=buffers)
    names = list(slots) if select is None else selectors.select(model, select, buffers=buffers)
    results: dict[str, Any] = {}
    problems: list[str] = []
    seen: set[int] = set()
    with torch.no_grad():
        for name in names:
            slot = slots[name]
            if id(slot.tensor) in seen:
                continue  # a tied tensor is changed once, not once per name
            seen.add(id(slot.tensor))
            if slot.tensor.is_meta:
                problems.append(f"{name!r}: the model's tensor is on the meta device and holds no data")
                continue
            copy = slot.tensor.detach().clone()
            try:
                out = fn(copy)
            except Exception as e:
                raise AssignError(
                    f"fn raised on {name!r} ({type(e).__name__}: {e}); nothing was written",
                    problems=(f"{name!r}: {e}",),
                ) from e
            if out is not None and not isinstance(out, torch.Tensor):
                problems.append(f"{name!r}: fn returned a {type(out).__name__}; return a tensor or None")
                continue
            results[name] = copy if out is None else out
        writes, _, more = check_writes(model, results, strict=True, slots=slots, what="result")
        problems += more
        if problems:
            refuse(problems, len(seen), verb="update")
        write_all(writes)
    return writes_report(writes, [])
