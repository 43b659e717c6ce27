"""Merge parameters that vary by key: per-selector values and gradients across layer index.

A parameter is given as

- a number: the same everywhere;
- a list of numbers: a gradient over the layer stack, the values spread evenly from the first
  layer to the last and interpolated linearly between (mergekit's convention); keys outside
  the layer stack take the first value;
- a list of ``(selector, value)`` pairs, each value a number or a gradient: the first pair
  whose selector matches the key decides; a key no pair matches is a plan problem.

The layer stack is the ``<container>.<index>.`` prefix with the most distinct indices
(``encoder.layer.3.``, ``model.layers.12.``), found from the keys alone, or named.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from ..selectors import compile_selector

__all__ = ["Layers", "find_layers", "resolve", "describe", "check_spec"]

@dataclass(frozen=True)
class Layers:
    """The layer stack: its container prefix and its indices in order."""

    container: str
    indices: tuple[int, ...]

    def index_of(self, key: str) -> int | None:
        """The layer index of ``key``, or ``None`` outside the stack."""
        lead = self.container + "." if self.container else ""
        if not key.startswith(lead):
            return None
        head = key[len(lead):].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def position(self, key: str) -> float | None:
        """Where ``key``'s layer lies in the stack, 0 (first) to 1 (last)."""
        i = self.index_of(key)
        if i is None or i not in self.indices:
            return None
        rank = self.indices.index(i)
        return rank / (len(self.indices) - 1) if len(self.indices) > 1 else 0.0


def find_layers(keys: Iterable[str], container: str | None = None) -> Layers | None:
    """The layer stack of a key set (``container`` names it; else the most numerous is chosen)."""
    found: dict[str, set[int]] = {}
    for key in keys:
        parts = key.split(".")
        for j, part in enumerate(parts[:-1]):
            if part.isdigit():
                found.setdefault(".".join(parts[:j]), set()).add(int(part))
    if container is not None:
        got = found.get(container)
        return Layers(container, tuple(sorted(got))) if got else None
    if not found:
        return None
    best = max(found, key=lambda p: (len(found[p]), -len(p)))
    return Layers(best, tuple(sorted(found[best])))


def _gradient(values: Sequence[float], pos: float | None) -> float:
    if pos is None or len(values) == 1:
        return float(values[0])
    x = pos * (len(values) - 1)
    i = min(int(x), len(values) - 2)
    frac = x - i
    return float(values[i]) * (1 - frac) + float(values[i + 1]) * frac


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_gradient(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_number(x) for x in v)


def check_spec(name: str, spec: Any) -> None:
    """Raise `UsageError` unless ``spec`` is a number, a gradient or a list of (selector, value)."""
    if _is_number(spec) or _is_gradient(spec):
        return
    ok = isinstance(spec, (list, tuple)) and len(spec) > 0 and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and (_is_number(p[1]) or _is_gradient(p[1])) for p in spec)
    if not ok:
        raise UsageError(f"parameter {name}={spec!r}: give a number, a list of numbers (a gradient over "
                         "the layers) or a list of (selector, value) pairs, e.g. "
                         "[('**.attn.**', [0, 0.5, 1]), ('**', 0.5)]")
    for sel, _ in spec:
        compile_selector(sel)


def resolve(spec: Any, key: str, layers: Layers | None) -> float | None:
    """The value of a parameter for ``key``; ``None`` when no selector matches it."""
    pos = layers.position(key) if layers is not None else None
    if _is_number(spec):
        return float(spec)
    if _is_gradient(spec):
        return _gradient(spec, pos)
    for sel, value in spec:
        if compile_selector(sel)(key):
            return float(value) if _is_number(value) else _gradient(value, pos)
    return None


def describe(spec: Any) -> Any:
    """The spec as plain data for a plan's text and JSON."""
    if _is_number(spec) or _is_gradient(spec):
        return spec if _is_number(spec) else list(spec)
    return [[str(sel), value if _is_number(value) else list(value)] for sel, value in spec]
