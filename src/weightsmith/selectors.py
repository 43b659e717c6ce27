"""One way to pick parameters, buffers or checkpoint keys by name, type or predicate.

The grammar, used by every function that takes ``select=``:

========================  ==========================================================
``"encoder.**.weight"``   glob on dotted names: ``*`` matches within one segment,
                          ``**`` any number of whole segments (including none),
                          ``?`` one character. A pattern also selects everything
                          below what it matches, so ``"encoder"`` selects its subtree.
``"query"``               a bare identifier (letters, digits, ``_``; no dot, no
                          wildcard) matches every key with that segment anywhere,
                          as ``grep -w`` would: ``attention.self.query.weight``.
``"layers.{i}.mlp"``      ``{name}`` captures one segment (used by rename rules).
``"re:^head\\.(w|b)"``     a regular expression, matched with ``re.search``.
``nn.LayerNorm``          a module type: the parameters that modules of that type hold
                          directly (needs a model).
``lambda name, t: ...``   a predicate on the dotted name and the tensor.
``["a.*", "!a.bias"]``    a list is the union of its items, minus the exclusions
                          (items starting with ``!``). A list of only exclusions
                          starts from everything.
========================  ==========================================================

A selector that matches nothing is an error unless ``allow_empty=True``: a typo must not
silently freeze nothing. The error names the closest keys.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from .errors import SelectorError

__all__ = ["Selector", "Matcher", "compile_selector", "select", "glob_to_regex"]

Selector = Union[str, type, Callable[[str, Any], bool], Sequence["Selector"]]


@functools.lru_cache(maxsize=512)
def glob_to_regex(pattern: str, *, subtree: bool = True) -> re.Pattern[str]:
    """Translate a dotted-name glob into a compiled regex.

    Args:
        pattern: the glob, e.g. ``"blocks.{i}.attn.*"``.
        subtree: also match names below what the pattern matches.

    >>> bool(glob_to_regex("encoder.**.weight").match("encoder.layer.0.weight"))
    True
    """
    if not pattern or pattern.startswith(".") or pattern.endswith(".") or ".." in pattern:
        raise SelectorError(f"malformed glob {pattern!r}: segments must be non-empty")
    segments = pattern.split(".")
    parts: list[str] = []
    for i, seg in enumerate(segments):
        if seg == "**":
            if i == 0:  # leading: whole segments, each with its dot
                parts.append(r"(?:[^.]+\.)*" if len(segments) > 1 else r".*")
            else:  # inner or trailing: whole segments, each after its dot
                parts.append(r"(?:\.[^.]+)*")
            continue
        dot = r"\." if i and not (i == 1 and segments[0] == "**") else ""
        parts.append(dot + _segment_regex(seg, pattern))
    tail = r"(?:\..+)?" if subtree else ""
    return re.compile("^" + "".join(parts) + tail + "$")


def _segment_regex(seg: str, pattern: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(seg):
        c = seg[i]
        if c == "*":
            if seg.startswith("**", i):
                raise SelectorError(f"malformed glob {pattern!r}: '**' must be a whole segment")
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "{":
            end = seg.find("}", i)
            name = seg[i + 1:end] if end > 0 else ""
            if not name.isidentifier():
                raise SelectorError(f"malformed glob {pattern!r}: capture needs a name like {{i}}")
            out.append(f"(?P<{name}>[^.]+)")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class Matcher:
    """A compiled selector: ``matcher(name, value, owner)`` says whether it picks ``name``."""

    include: tuple[Callable[[str, Any, Any], bool], ...]
    exclude: tuple[Callable[[str, Any, Any], bool], ...]
    text: str
    needs_owner: bool = False

    def __call__(self, name: str, value: Any = None, owner: Any = None) -> bool:
        hit = not self.include or any(f(name, value, owner) for f in self.include)
        return hit and not any(f(name, value, owner) for f in self.exclude)


def compile_selector(selector: Selector) -> Matcher:
    """Compile a selector (see the module docstring for the grammar) into a `Matcher`."""
    if isinstance(selector, Matcher):
        return selector
    items: Iterable[Any] = (
        selector if isinstance(selector, (list, tuple, set, frozenset)) else (selector,)
    )
    include: list[Callable[[str, Any, Any], bool]] = []
    exclude: list[Callable[[str, Any, Any], bool]] = []
    needs_owner = False
    texts: list[str] = []
    for item in items:
        negate = isinstance(item, str) and item.startswith("!")
        if negate:
            item = item[1:]
        fn, owner = _compile_one(item)
        needs_owner |= owner
        (exclude if negate else include).append(fn)
        texts.append(("!" if negate else "") + _describe(item))
    if not include and not exclude:
        raise SelectorError("empty selector: give at least one pattern, type or predicate")
    return Matcher(tuple(include), tuple(exclude), ", ".join(texts), needs_owner)


def _describe(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, type):
        return item.__name__
    return getattr(item, "__name__", repr(item))


def _compile_one(item: Any) -> tuple[Callable[[str, Any, Any], bool], bool]:
    if isinstance(item, str):
        if item.startswith("re:"):
            try:
                rx = re.compile(item[3:])
            except re.error as e:
                raise SelectorError(f"malformed regex selector {item!r}: {e}") from e
            return (lambda name, _v, _o: rx.search(name) is not None), False
        if item.isidentifier():  # a bare word: any key with this segment, at any depth
            rx = re.compile(rf"(?:^|\.){re.escape(item)}(?:\.|$)")
            return (lambda name, _v, _o: rx.search(name) is not None), False
        rx = glob_to_regex(item)
        return (lambda name, _v, _o: rx.match(name) is not None), False
    if isinstance(item, type):
        return (lambda _n, _v, owner: isinstance(owner, item)), True
    if callable(item):
        return (lambda name, value, _o: bool(item(name, value))), False
    raise SelectorError(
        f"cannot use {item!r} as a selector: give a glob, 're:regex', a module type or a callable"
    )


def select(
    items: Mapping[str, Any] | Any,
    selector: Selector,
    *,
    allow_empty: bool = False,
    buffers: bool = False,
) -> list[str]:
    """Names in ``items`` picked by ``selector``, in their original order.

    Args:
        items: a mapping of name → tensor (a state dict, a `Checkpoint`) or an ``nn.Module``
            (its parameters, and its buffers too when ``buffers=True``).
        selector: see the module docstring.
        allow_empty: return ``[]`` instead of raising when nothing matches.
        buffers: with a module, also consider its buffers.

    Raises:
        SelectorError: the selector is malformed, or matched nothing.

    >>> select({"0.weight": 1, "0.bias": 2, "2.weight": 3}, "*.weight")
    ['0.weight', '2.weight']
    """
    matcher = compile_selector(selector)
    named, owners = _named(items, buffers=buffers, need_owner=matcher.needs_owner)
    if matcher.needs_owner and owners is None:
        raise SelectorError(f"selector {matcher.text!r} picks by module type and needs a model")
    picked = [n for n, v in named if matcher(n, v, owners[n] if owners is not None else None)]
    if not picked and not allow_empty:
        raise SelectorError(
            f"selector {matcher.text!r} matched nothing among {len(named)} names "
            f"({closest_keys(matcher.text, [n for n, _ in named])}); check the spelling, "
            f"or pass allow_empty=True"
        )
    return picked


def closest_keys(text: str, names: Sequence[str], *, n: int = 5) -> str:
    """``"closest keys: a, b"``: the names most like ``text`` (its wildcards ignored), for an
    error that matched nothing; the first names when none is close.

    >>> closest_keys("decoder.*.wieght", ["encoder.0.weight", "encoder.0.bias", "head.weight"])
    'closest keys: encoder.0.weight, encoder.0.bias, head.weight'
    """
    import difflib

    if not names:
        return "nothing to select from"
    probe = re.sub(r"^(re:|!)|[*?^$\\()\[\]{}+|]", "", text).strip(".")
    scored = sorted(((difflib.SequenceMatcher(None, probe, name).ratio(), i) for i, name in enumerate(names)),
                    key=lambda p: (-p[0], p[1]))
    close = [names[i] for ratio, i in scored[:n] if ratio >= 0.5]
    if close:
        return "closest keys: " + ", ".join(close)
    return "e.g. " + ", ".join(names[:n])


def _named(items: Any, *, buffers: bool, need_owner: bool) -> tuple[list[tuple[str, Any]], dict[str, Any] | None]:
    if hasattr(items, "named_parameters") and hasattr(items, "named_modules"):
        named: list[tuple[str, Any]] = []
        owners: dict[str, Any] = {}
        seen: set[str] = set()
        for mod_name, mod in items.named_modules(remove_duplicate=False):
            prefix = f"{mod_name}." if mod_name else ""
            pairs = list(mod.named_parameters(recurse=False, remove_duplicate=False))
            if buffers:
                pairs += list(mod.named_buffers(recurse=False, remove_duplicate=False))
            for short, value in pairs:
                full = prefix + short
                if full not in seen:
                    seen.add(full)
                    named.append((full, value))
                    owners[full] = mod
        return named, owners
    if isinstance(items, Mapping) or hasattr(items, "keys"):
        return [(k, items[k]) for k in items.keys()], None
    raise SelectorError(f"cannot select from {type(items).__name__}: give a mapping or an nn.Module")
