"""A checkpoint's keys renamed on the way out: prefixes stripped, ``SRC=DST`` globs, rule files.

`key_map` says where each key goes; `renamed` shows an opened checkpoint under the new names
without reading or copying a tensor (a view over the same reader), so `convert` writes the new
names as it streams. Every option must rename something (an option that matches nothing is a
typo), and two keys must never land on one name; both are errors listing every case at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

__all__ = ["key_map", "renamed"]


def key_map(keys: Sequence[str], *, prefixes: Sequence[str] = (), renames: Sequence[str] = (),
            rules: str | None = None) -> dict[str, str]:
    """Old key -> new key: prefixes stripped first (the first that fits), then the first rule
    that renames the key. Raises `UsageError` for unused options, rules with tensor
    transforms, and collisions."""
    from .warmstart.keymap import Rule, as_rules

    problems: list[str] = []
    parsed: list[Rule] = []
    for text in renames:
        src, sep, dst = text.partition("=")
        if not sep or not src or not dst:
            problems.append(f"--rename {text!r}: write SRC=DST, e.g. 'bert.encoder=encoder'")
            continue
        parsed.append(Rule(src.strip(), dst.strip()))
    every = (*parsed, *(as_rules(rules) if rules else ()))
    for rule in every:
        if rule.transform or len(rule.sources) != 1 or len(rule.targets) != 1:
            problems.append(f"rule {rule}: convert renames one key to one key; tensor transforms are "
                            f"for plan and warmstart")
    stripped = [p if p.endswith(".") else p + "." for p in prefixes]
    used: set[object] = set()
    out: dict[str, str] = {}
    for key in keys:
        name = key
        for prefix in stripped:
            if name.startswith(prefix):
                name, _ = name[len(prefix):], used.add(prefix)
                break
        for i, rule in enumerate(every):
            new = rule.rename(name)
            if new is not None:
                name = new
                used.add(i)
                break
        out[key] = name
    problems += [f"--strip-prefix {p!r} matched no key" for p in stripped if p not in used]
    problems += [f"rule {rule} matched no key" for i, rule in enumerate(every) if i not in used]
    landing: dict[str, list[str]] = {}
    for key, name in out.items():
        landing.setdefault(name, []).append(key)
    problems += [f"{', '.join(map(repr, old))} all become {new!r}" for new, old in landing.items() if len(old) > 1]
    if problems:
        raise UsageError("cannot rename: " + "; ".join(problems[:20])
                         + (f"; and {len(problems) - 20} more" if len(problems) > 20 else ""))
    return out


def renamed(ckpt: Any, mapping: dict[str, str]) -> Any:
    """``ckpt`` seen under new names (``mapping``: old -> new); the same reader, nothing copied."""
    from .checkpoint import Checkpoint

    return Checkpoint(_RenamedReader(ckpt.reader, mapping))  # type: ignore[arg-type]


@dataclass
class _RenamedReader:
    inner: Any
    mapping: dict[str, str]

    def __post_init__(self) -> None:
        self.old = {new: old for old, new in self.mapping.items()}
        self.infos = {self.mapping[k]: info for k, info in self.inner.infos.items() if k in self.mapping}

    def __getattr__(self, name: str) -> Any:  # path, format, metadata, root, roots, notes...
        return getattr(self.inner, name)

    def tensor(self, key: str) -> Any:
        return self.inner.tensor(self.old[key])

    def release(self, key: str) -> None:
        self.inner.release(self.old[key])

    def aliases(self) -> dict[str, str]:
        return {self.mapping[a]: self.mapping[k] for a, k in self.inner.aliases().items()
                if a in self.mapping and k in self.mapping}

    def close(self) -> None:
        self.inner.close()
