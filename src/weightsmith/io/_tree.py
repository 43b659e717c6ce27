"""Finding the state dict inside a nested checkpoint object: roots, flattening, other objects."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ._pickle import Opaque

__all__ = ["PREFERRED_ROOTS", "find_roots", "choose_root", "resolve_root", "flatten", "other_objects"]

# Where training code keeps the model's state dict, in the order a default root is chosen.
PREFERRED_ROOTS = (
    "state_dict",        # Lightning, most training scripts
    "model",             # timm, fairseq, many scripts
    "module",            # DeepSpeed
    "model_state_dict",  # tutorials
    "model_state",
    "net",
    "network",
    "params",
    "weights",
)
_EMA_HINTS = ("ema",)  # EMA copies are alternatives, never the default


def _children(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        yield from ((str(k), v) for k, v in node.items())
    elif isinstance(node, (list, tuple)):
        yield from ((str(i), v) for i, v in enumerate(node))


def find_roots(tree: Any, is_tensor: Callable[[Any], bool]) -> list[tuple[str, int]]:
    """Paths (``/``-separated) of plain dicts that hold tensors directly, with their tensor counts.

    Objects of classes off the allowlist are not descended into: their contents are not a
    state dict, and reading them would mean constructing them.
    """
    found: list[tuple[str, int]] = []
    stack: list[tuple[str, Any]] = [("", tree)]
    seen: set[int] = set()
    while stack:
        path, node = stack.pop()
        if id(node) in seen or not isinstance(node, (dict, list, tuple)):
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            n = sum(1 for _, v in _children(node) if is_tensor(v))
            if n:
                found.append((path, n))
        kids = list(_children(node))
        for name, child in reversed(kids):
            stack.append((f"{path}/{name}" if path else name, child))
    return found


def choose_root(roots: list[tuple[str, int]]) -> str | None:
    """The default root: a well-known name, else the top when it holds tensors, else the largest."""
    counts = dict(roots)
    for name in PREFERRED_ROOTS:
        if name in counts and counts[name] >= counts.get("", 0):
            return name
    if "" in counts:
        return ""
    plain = [(p, n) for p, n in roots if not any(h in p.lower() for h in _EMA_HINTS)
             and not p.startswith("optimizer")]
    pool = plain or roots
    return max(pool, key=lambda pn: pn[1])[0] if pool else None


def resolve_root(tree: Any, root: str) -> Any:
    """The node at a ``/``-separated root path, or ``KeyError``."""
    node = tree
    for part in root.split("/") if root else []:
        if isinstance(node, dict):
            node = node[part] if part in node else node[_int_key(node, part)]
        elif isinstance(node, (list, tuple)):
            node = node[int(part)]
        else:
            raise KeyError(root)
    return node


def _int_key(node: dict[Any, Any], part: str) -> Any:
    for k in node:
        if str(k) == part:
            return k
    raise KeyError(part)


def flatten(node: Any, is_tensor: Callable[[Any], bool]) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors under ``node`` with dotted keys (nested dicts joined by ``.``), and the rest by type."""
    tensors: dict[str, Any] = {}
    others: dict[str, str] = {}
    # a pickle can share one dict under many names or nest it in itself: walking each dict
    # once keeps a few bytes of pickle from unfolding into billions of keys
    walked: set[int] = {id(node)}

    def walk(prefix: str, cur: Any, depth: int) -> None:
        for name, child in _children(cur):
            key = f"{prefix}.{name}" if prefix else name
            if is_tensor(child):
                tensors[key] = child
            elif isinstance(child, dict) and depth < 32 and id(child) not in walked:
                walked.add(id(child))
                walk(key, child, depth + 1)
            else:
                others[key] = describe(child)

    walk("", node, 0)
    return tensors, others


def other_objects(tree: Any, is_tensor: Callable[[Any], bool], root: str) -> dict[str, str]:
    """Objects outside the root that are not plain data, by path: class names, never constructed."""
    out: dict[str, str] = {}
    stack: list[tuple[str, Any]] = [("", tree)]
    seen: set[int] = set()
    while stack:
        path, node = stack.pop()
        if path == root or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, Opaque):
            out[path or "/"] = node._ws_global
            continue
        for name, child in _children(node):
            stack.append((f"{path}/{name}" if path else name, child))
    return dict(sorted(out.items()))


def describe(value: Any) -> str:
    """A short type description of a non-tensor value."""
    if isinstance(value, Opaque):
        return value._ws_global
    return type(value).__name__
