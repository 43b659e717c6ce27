"""Typed steps on a value's way from the source to its target: parsed once, applied, shape known.

A plan records, for each target key, the operations that turn its source tensor(s) into the
target's value: rule transforms (`Transform`: ``cat(0)``, ``chunk(3, 0)``, ``transpose``...), a
shape adapter (`Adapter`, from `adapt`), and a dtype cast (`Cast`, done by the write itself).
Each is an object with a text form for the plan's rendering; execution applies the objects
(`apply_ops`) and never parses text again.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

from ..errors import UsageError
from .adapt import Adapter

__all__ = ["Transform", "Cast", "Adapter", "Op", "parse_transforms", "apply_transform", "expected_shape",
           "apply_ops"]


_TRANSFORMS = {"transpose", "t", "cat", "chunk", "split", "reshape", "permute", "slice", "flatten"}


@dataclass(frozen=True)
class Transform:
    """One tensor transform, e.g. ``cat(0)``, ``chunk(3, 0)``, ``transpose``, ``slice(0, 0, 768)``."""

    name: str
    args: tuple[Any, ...] = ()

    def __str__(self) -> str:
        return self.name + (f"({', '.join(map(str, self.args))})" if self.args else "")


def parse_transforms(text: str | None) -> tuple[Transform, ...]:
    """Parse ``"transpose | reshape(768, 3, 64)"`` (``|`` chains) without evaluating code."""
    if not text:
        return ()
    out = []
    for part in text.split("|"):
        part = part.strip()
        m = re.fullmatch(r"([a-z_]+)\s*(?:\((.*)\))?", part)
        if not m or m.group(1) not in _TRANSFORMS:
            raise UsageError(
                f"unknown tensor transform {part!r}; known: {', '.join(sorted(_TRANSFORMS))}")
        args: tuple[Any, ...] = ()
        if m.group(2):
            try:
                value = ast.literal_eval(f"({m.group(2)},)")
            except (ValueError, SyntaxError) as e:
                raise UsageError(f"bad arguments in transform {part!r}: {e}") from e
            args = tuple(value)
        out.append(Transform(m.group(1), args))
    return tuple(out)


def apply_transform(tensors: Sequence[Any], transforms: Sequence[Transform], *, index: int = 0) -> Any:
    """Turn the source tensor(s) into one target tensor.

    Many-to-one: ``cat(dim)`` joins the sources. One-to-many: ``chunk(n, dim)`` / ``split`` takes
    piece ``index`` (the position of the target in the rule). Others apply to one tensor.
    """
    import torch

    current: Any = list(tensors)
    for tr in transforms:
        if tr.name == "cat":
            current = [torch.cat(current, dim=tr.args[0] if tr.args else 0)]
            continue
        if len(current) != 1:
            raise UsageError(f"transform {tr} needs one tensor, got {len(current)}: add cat(dim) first")
        t = current[0]
        if tr.name in ("transpose", "t"):
            t = t.transpose(*(tr.args or (0, 1)))
        elif tr.name in ("chunk", "split"):
            n, dim = (tr.args + (0,))[:2] if tr.args else (1, 0)
            t = torch.chunk(t, int(n), dim=int(dim))[index]
        elif tr.name == "reshape":
            t = t.reshape(*tr.args)
        elif tr.name == "permute":
            t = t.permute(*tr.args)
        elif tr.name == "flatten":
            t = t.flatten(*tr.args)
        elif tr.name == "slice":
            dim, start, stop = tr.args
            t = t.narrow(int(dim), int(start), int(stop) - int(start))
        current = [t]
    if len(current) != 1:
        raise UsageError(f"{len(current)} source tensors for one target: add cat(dim) to the rule")
    return current[0]


def expected_shape(shapes: Sequence[tuple[int, ...]], transforms: Sequence[Transform], *, index: int = 0
                   ) -> tuple[int, ...]:
    """The shape `apply_transform` would produce, computed on meta tensors (no data)."""
    import torch

    metas = [torch.empty(s, device="meta") for s in shapes]
    return tuple(apply_transform(metas, transforms, index=index).shape)


@dataclass(frozen=True)
class Cast:
    """A dtype change, done by the write into the target (recorded so the plan says it happens)."""

    source: str
    target: str

    def __str__(self) -> str:
        return f"cast {self.source}->{self.target}"


Op = Union[Transform, Adapter, Cast]


def apply_ops(tensors: Sequence[Any], ops: Sequence[Op], *, index: int = 0, current: Any = None) -> Any:
    """The value the ops make of the source tensor(s): rule transforms, then any adapter.

    ``current`` is the target's present value (an adapter may keep part of it); casts are left to
    the write, which converts to the target's dtype.
    """
    rule = [o for o in ops if isinstance(o, Transform)]
    value = apply_transform(tensors, rule, index=index) if rule else tensors[0]
    for op in ops:
        if isinstance(op, Adapter):
            value = op.fn(value, current)
    return value
