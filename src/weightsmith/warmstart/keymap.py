"""Pure name transforms for warm-starting: wrapper prefixes, rename rules, natural key order.

Nothing here touches a model or a tensor; a rule's tensor transforms are parsed by `transforms`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SelectorError, UsageError, WeightsmithError
from ..selectors import glob_to_regex
from .transforms import Transform, parse_transforms

__all__ = ["WRAPPER_PREFIXES", "PrefixMap", "align_prefixes", "Rule", "as_rules", "load_rules",
           "natural_key"]

# Prefixes that training wrappers put in front of every key; any nesting of them is handled.
WRAPPER_PREFIXES = (
    "module.",            # DataParallel / DistributedDataParallel
    "_orig_mod.",         # torch.compile
    "_forward_module.",   # Lightning Fabric / DeepSpeed wrappers
    "model.",             # Lightning modules holding `self.model`
    "base_model.model.",  # PEFT
    "backbone.",          # detection / segmentation frameworks
    "encoder.",
)


@dataclass(frozen=True)
class PrefixMap:
    """``strip`` is removed from source keys that start with it, then ``add`` is put in front."""

    strip: str = ""
    add: str = ""

    def __call__(self, key: str) -> str:
        if self.strip and key.startswith(self.strip):
            key = key[len(self.strip):]
        return self.add + key

    def describe(self) -> str:
        parts = []
        if self.strip:
            parts.append(f"strip {self.strip!r}")
        if self.add:
            parts.append(f"add {self.add!r}")
        return ", ".join(parts) or "none"


def _leading_prefixes(keys: Iterable[str], depth: int = 3) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, min(depth, len(parts) - 1) + 1):
            p = ".".join(parts[:n]) + "."
            counts[p] = counts.get(p, 0) + 1
    return counts


def align_prefixes(source: Iterable[str], target: Iterable[str]) -> PrefixMap:
    """The prefix change that makes the most source keys name target keys.

    Tries stripping any leading segments shared by source keys (``module.``, ``_orig_mod.module.``,
    ``bert.``, ``base_model.model.``) and adding any shared by target keys; prefers no change,
    then known wrapper prefixes, when several do equally well.
    """
    src, tgt = list(source), set(target)
    strips = [""] + [p for p, n in _leading_prefixes(src).items() if _prefix_like(p, n, len(src))]
    adds = [""] + [p for p, n in _leading_prefixes(tgt).items() if _prefix_like(p, n, len(tgt))]
    best, best_score = PrefixMap(), -1
    for strip in strips:
        stripped = [k[len(strip):] if strip and k.startswith(strip) else k for k in src]
        for add in adds:
            hits = sum(1 for k in stripped if add + k in tgt)
            known = all(_is_wrapper(p) for p in (strip, add) if p)
            score = hits * 4 + (2 if known else 0) - (len(strip) + len(add) > 0)
            if hits and score > best_score:
                best, best_score = PrefixMap(strip, add), score
    return best


def _prefix_like(prefix: str, count: int, total: int) -> bool:
    # A known wrapper may cover part of the keys (a backbone inside a detector); any other shared
    # segment must cover most of them, or renaming one module ("q." -> "qk.") would pass for a prefix.
    if _is_wrapper(prefix):
        return count * 4 >= total or count >= 2
    return count * 2 > total


def _is_wrapper(prefix: str) -> bool:
    rest = prefix
    while rest:
        for w in WRAPPER_PREFIXES:
            if rest.startswith(w):
                rest = rest[len(w):]
                break
        else:
            return False
    return True


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that orders ``layer.2`` before ``layer.10`` (file order is not module order)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


# -- rename rules ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """A rename from source names to target names, with an optional tensor transform.

    ``source`` and ``target`` are dotted-name patterns matched by whole segments, with ``{name}``
    capturing one segment; a pattern that names a module renames every tensor under it
    (``.weight``, ``.bias``). Several sources with ``cat(dim)`` fuse (q, k, v -> qkv); several
    targets with ``chunk(n, dim)`` split. A source starting with ``re:`` is a regular expression
    and the target its replacement (``\\1``).

    >>> Rule("encoder.layer.{i}.attention.self.query", "blocks.{i}.attn.q").rename("encoder.layer.3.attention.self.query.bias")
    'blocks.3.attn.q.bias'
    """

    source: str | tuple[str, ...]
    target: str | tuple[str, ...]
    transform: str | None = None
    transforms: tuple[Transform, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        bad = [p for p in (*self.sources, *self.targets) if not isinstance(p, str) or not p]
        if bad or not isinstance(self.transform, (str, type(None))):
            raise SelectorError(f"rule {self.source!r} -> {self.target!r}: patterns must be non-empty strings "
                                f"and the transform a string, got {(bad or [self.transform])[0]!r}")
        object.__setattr__(self, "transforms", parse_transforms(self.transform))
        regex = any(p.startswith("re:") for p in self.sources)
        if regex and (len(self.sources) > 1 or len(self.targets) > 1):
            raise SelectorError(f"rule {self}: a regex rule renames one source to one target")
        try:
            if regex:  # compiles the pattern and checks the replacement's group references
                re.compile(self.sources[0][3:]).sub(self.targets[0], "")
            for pat in () if regex else (*self.sources, *self.targets):
                glob_to_regex(pat)  # raises SelectorError on a malformed pattern
        except re.error as e:  # a bad regex, or one capture name used twice in a pattern
            raise SelectorError(f"rule {self}: {e}") from e
        if len(self.sources) > 1 and len(self.targets) > 1:
            raise SelectorError(f"rule {self}: several sources and several targets at once is not supported")
        if len(self.sources) > 1 and not any(t.name == "cat" for t in self.transforms):
            raise SelectorError(f"rule {self}: several sources need a cat(dim) transform")

    @property
    def sources(self) -> tuple[str, ...]:
        return self.source if isinstance(self.source, tuple) else (self.source,)

    @property
    def targets(self) -> tuple[str, ...]:
        return self.target if isinstance(self.target, tuple) else (self.target,)

    def __str__(self) -> str:
        s = self.sources[0] if len(self.sources) == 1 else "(" + ", ".join(self.sources) + ")"
        t = self.targets[0] if len(self.targets) == 1 else "(" + ", ".join(self.targets) + ")"
        return f"{s} -> {t}" + (f" [{self.transform}]" if self.transform else "")

    def match(self, key: str, which: int = 0) -> tuple[dict[str, str], str] | None:
        """Captures and the remaining suffix when source pattern ``which`` matches ``key``."""
        pat = self.sources[which]
        if pat.startswith("re:"):
            return ({}, "") if re.search(pat[3:], key) else None
        m = glob_to_regex(pat, subtree=False).match(key)
        if m:
            return m.groupdict(), ""
        rx = _prefix_regex(pat)
        m = rx.match(key)
        if m:
            return m.groupdict(), key[m.end():]
        return None

    def rename(self, key: str) -> str | None:
        """The target name for a one-to-one rule, or ``None`` when the rule does not apply."""
        if len(self.sources) != 1 or len(self.targets) != 1:
            return None
        pat = self.sources[0]
        if pat.startswith("re:"):
            new, n = re.subn(pat[3:], self.targets[0], key)
            return new if n else None
        hit = self.match(key)
        if hit is None:
            return None
        caps, suffix = hit
        return fill(self.targets[0], caps) + suffix

    def source_names(self, caps: Mapping[str, str], suffix: str) -> tuple[str, ...]:
        return tuple(fill(p, caps) + suffix for p in self.sources)

    def target_names(self, caps: Mapping[str, str], suffix: str) -> tuple[str, ...]:
        return tuple(fill(p, caps) + suffix for p in self.targets)


def _prefix_regex(pattern: str) -> re.Pattern[str]:
    rx = glob_to_regex(pattern, subtree=False)
    return re.compile(rx.pattern.rstrip("$") + r"(?=\.)")


def fill(pattern: str, caps: Mapping[str, str]) -> str:
    """Put captured segments into ``{name}`` placeholders."""
    try:
        return re.sub(r"\{(\w+)\}", lambda m: caps[m.group(1)], pattern)
    except KeyError as e:
        raise SelectorError(f"pattern {pattern!r} uses {{{e.args[0]}}}, which its source does not capture") from e


def as_rules(rename: Any) -> tuple[Rule, ...]:
    """Rules from a `Rule`, a (source, target[, transform]) tuple, a mapping, a list, or a file path."""
    if not rename:
        return ()
    if isinstance(rename, (str, Path)):
        return load_rules(rename)
    if isinstance(rename, Rule):
        return (rename,)
    if isinstance(rename, Mapping):
        return tuple(Rule(str(k), str(v)) for k, v in rename.items())
    if not isinstance(rename, Iterable):
        raise SelectorError(f"cannot read rename rules from a {type(rename).__name__}: give Rule objects, "
                            "(source, target[, transform]) tuples, a mapping or a rules file path")
    rules: list[Rule] = []
    for item in rename:
        if isinstance(item, Rule):
            rules.append(item)
        elif isinstance(item, Mapping):
            rules.append(_rule_from_mapping(item))
        elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
            src, tgt = (tuple(x) if isinstance(x, list) else x for x in item[:2])
            rules.append(Rule(src, tgt, item[2] if len(item) == 3 else None))
        else:
            raise SelectorError(f"cannot read rename rule {item!r}: give (source, target[, transform])")
    return tuple(rules)


def _rule_from_mapping(item: Mapping[str, Any]) -> Rule:
    if not isinstance(item, Mapping):
        raise SelectorError(f"rename rule {item!r} must be a table with 'source' and 'target'")
    if "source" not in item or "target" not in item:
        raise SelectorError(f"rename rule {dict(item)!r} needs 'source' and 'target'")
    src, tgt = item["source"], item["target"]
    return Rule(tuple(src) if isinstance(src, list) else src, tuple(tgt) if isinstance(tgt, list) else tgt,
                item.get("transform"))


def load_rules(path: str | Path) -> tuple[Rule, ...]:
    """Read rules from a ``.toml`` (``[[rename]]`` tables) or ``.json`` (a list) file.

    ::

        [[rename]]
        source = "encoder.layer.{i}.attention.self.query"
        target = "blocks.{i}.attn.q"

        [[rename]]
        source = ["a.{i}.q", "a.{i}.k", "a.{i}.v"]
        target = "b.{i}.qkv"
        transform = "cat(0)"
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"{p}: cannot read the rules file ({e.strerror or e})") from e
    try:
        if p.suffix == ".toml":
            import tomllib

            data: Any = tomllib.loads(text).get("rename", [])
        else:
            data = json.loads(text)
            data = data.get("rename", []) if isinstance(data, dict) else data
    except ValueError as e:
        raise UsageError(f"{p}: the rules file is not valid {p.suffix.lstrip('.') or 'JSON'} ({e})") from e
    if not isinstance(data, list):
        raise UsageError(f"{p}: expected a list of rename rules")
    rules = []
    for i, item in enumerate(data, 1):
        try:
            rules.append(_rule_from_mapping(item))
        except WeightsmithError as e:  # say which file and which rule
            raise type(e)(f"{p}: rule {i}: {e}") from e
    return tuple(rules)
