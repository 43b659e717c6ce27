"""Structural matching: pair the modules that names left unpaired, by aligning two module sequences.

Each side is cut into *units*: the tensors directly under one module path (a Linear's weight and
bias are one unit, and move together). A unit's signature is its tensors' leaf names, shapes and
dtype kinds. The two unit sequences (the target in model order, the source in its own order) are
aligned the way a diff aligns lines; aligned units pair their tensors. Nothing is guessed: a
pairing is refused, and reported with both sides' names and shapes and the reason, when

- the two sides hold different numbers of units of one signature;
- same-shaped siblings are paired by order while their names say otherwise;
- it would cross subtrees: the source's other tensors went under one target subtree (``bert.*``)
  and this target lies outside it (``cls.predictions.*``), or the reverse; or the target lies in
  the subtree a sibling of the source went to (layer 3's norm into block 4).

A source whose order is not its module order (a safetensors file stores names sorted) is not
aligned: a signature pairs only where one unit holds it on each side, or where its units differ
only by their indices. A source written with ``Conv1D`` layers (weights stored ``[in, out]``) is
recognized when the alignment with ``nn.Linear`` targets' weights transposed pairs more than the
plain one; each such pairing names the ``transpose``.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from .keymap import natural_key
from .transforms import Transform

__all__ = ["Unit", "Pairing", "Ambiguity", "Matching", "match_modules"]

Spec = tuple[tuple[int, ...], str]  # (shape, dtype)

# Leaf names that mean the same thing in every module that has them; others ("cls_token",
# "pos_embed", "position_embeddings") are paired by shape, then by name.
_STANDARD = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked",
                       "in_proj_weight", "in_proj_bias", "weight_g", "weight_v"})


@dataclass(frozen=True)
class Unit:
    """The tensors directly under one module path, in order: ``(key, shape, dtype)``."""

    path: str
    tensors: tuple[tuple[str, tuple[int, ...], str], ...]

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def parent(self) -> str:
        return self.path.rpartition(".")[0]

    def describe(self) -> str:
        inner = ", ".join(f"{_leaf(k)} {list(s)}" for k, s, _ in self.tensors)
        return f"{self.path or '<root>'} ({inner})"


@dataclass(frozen=True)
class Pairing:
    """One source tensor paired with one target tensor, and why."""

    source: str
    target: str
    source_module: str
    target_module: str
    transform: Transform | None
    confidence: float
    reason: str


@dataclass(frozen=True)
class Ambiguity:
    """Candidates not paired, with both sides' names and shapes and the reason."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        return self.reason


@dataclass
class Matching:
    """What `match_modules` found: pairings, and ambiguities it refused to guess."""

    pairs: list[Pairing] = field(default_factory=list)
    ambiguous: list[Ambiguity] = field(default_factory=list)
    layout: str = "plain"  # "plain", or "conv1d" when source 2-D weights were transposed


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _kind(dtype: str) -> str:
    return "float" if dtype.startswith(("float", "bfloat", "complex")) else dtype


def _units(specs: Mapping[str, Spec], order: Sequence[str]) -> list[Unit]:
    """Group ``order``'s keys into units by module path, in order of first appearance."""
    grouped: dict[str, list[tuple[str, tuple[int, ...], str]]] = {}
    for k in order:
        shape, dtype = specs[k]
        grouped.setdefault(k.rpartition(".")[0], []).append((k, tuple(shape), dtype))
    return [Unit(p, tuple(ts)) for p, ts in grouped.items()]


def _signature(unit: Unit, *, transposed: bool = False) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    out = []
    for k, shape, dtype in unit.tensors:
        leaf = _leaf(k)
        if transposed and leaf == "weight" and len(shape) == 2:
            shape = (shape[1], shape[0])
        out.append((leaf if leaf in _STANDARD else "*", shape, _kind(dtype)))
    return tuple(sorted(out))


def _show(sig: tuple[tuple[str, tuple[int, ...], str], ...]) -> str:
    return ", ".join(f"{leaf} {list(shape)}" for leaf, shape, _ in sig)


def _under(path: str, root: str) -> bool:
    return not root or path == root or path.startswith(root + ".")


def _common(paths: Collection[str]) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    out: list[str] = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        out.append(segs[0])
    return ".".join(out)


def _name_score(a: str, b: str) -> int:
    """How strongly two module names say they are the same thing: 3 same, 2 prefix, 1 abbreviation."""
    a, b = a.lower().replace("_", ""), b.lower().replace("_", "")
    if a == b:
        return 3
    if a.startswith(b) or b.startswith(a):
        return 2
    short, long = sorted((a, b), key=len)
    if short and short[0] == long[0]:
        it = iter(long)
        if all(c in it for c in short):  # a subsequence: "attn" of "attention"
            return 1
    return 0


def _by_names(src: Sequence[str], tgt: Sequence[str]) -> dict[str, str] | None:
    """The one best bijection of ``src`` onto ``tgt`` names, if names decide it, else ``None``."""
    if len(src) != len(tgt) or len(src) > 6:
        return None
    best, best_score, tie = None, -1, False
    for perm in itertools.permutations(tgt):
        scores = [_name_score(a, b) for a, b in zip(src, perm)]
        if min(scores) == 0:
            continue
        s = sum(scores)
        if s > best_score:
            best, best_score, tie = dict(zip(src, perm)), s, False
        elif s == best_score:
            tie = True
    return None if tie else best


def _numeric(names: Sequence[str]) -> bool:
    return all(n.isdigit() for n in names)


def match_modules(source: Mapping[str, Spec], target: Mapping[str, Spec], *,
                  source_order: Sequence[str] | None = None, target_order: Sequence[str] | None = None,
                  anchors: Mapping[str, str] | None = None, source_ordered: bool = True,
                  linear: Collection[str] = ()) -> Matching:
    """Pair the ``source`` tensors with the ``target`` tensors by module structure.

    Args:
        source, target: the tensors left to pair: key -> (shape, dtype).
        source_order, target_order: their keys in structural order (default: mapping order;
            a source whose order is not trusted is sorted by `natural_key`).
        anchors: source key -> target key of the tensors already paired by name; they show
            which target subtree each source subtree went to.
        source_ordered: whether the source's order is its module order (a state dict, a model,
            a torch file); a safetensors file's is not.
        linear: target module paths that are ``nn.Linear`` (a ``Conv1D`` source transposes there).

    Returns:
        a `Matching`.
    """
    s_order = list(source_order if source_order is not None else source)
    if not source_ordered:
        s_order = sorted(s_order, key=natural_key)
    t_order = list(target_order if target_order is not None else target)
    su, tu = _units(source, s_order), _units(target, t_order)
    if not su or not tu:
        return Matching()
    best: Matching | None = None
    best_numel = -1
    layouts = ["plain"] + (["conv1d"] if any(u.path in linear for u in tu) else [])
    for layout in layouts:
        found = _align(su, tu, anchors or {}, source_ordered=source_ordered,
                       transposed={u.path for u in tu if u.path in linear} if layout == "conv1d" else set())
        found.layout = layout
        numel = sum(_numel_of(target[p.target][0]) for p in found.pairs)
        if numel > best_numel:
            best, best_numel = found, numel
    return best if best is not None else Matching()


def _numel_of(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _align(su: list[Unit], tu: list[Unit], anchors: Mapping[str, str], *, source_ordered: bool,
           transposed: set[str]) -> Matching:
    out = Matching()
    ssig = {u.path: _signature(u) for u in su}
    tsig = {u.path: _signature(u, transposed=u.path in transposed) for u in tu}
    # 1. a signature held by different numbers of units on the two sides is never paired by guess
    scount: dict[tuple, list[Unit]] = {}
    tcount: dict[tuple, list[Unit]] = {}
    for u in su:
        scount.setdefault(ssig[u.path], []).append(u)
    for u in tu:
        tcount.setdefault(tsig[u.path], []).append(u)
    uneven = {sig for sig in scount.keys() & tcount.keys() if len(scount[sig]) != len(tcount[sig])}
    for sig in sorted(uneven, key=str):
        ss, ts = scount[sig], tcount[sig]
        out.ambiguous.append(Ambiguity(
            tuple(k for u in ss for k, _, _ in u.tensors), tuple(k for u in ts for k, _, _ in u.tensors),
            f"{len(ss)} source and {len(ts)} target modules hold {_show(sig)}: which go together is not "
            f"guessed (source {', '.join(u.path for u in ss[:3])}{', ...' if len(ss) > 3 else ''}; "
            f"target {', '.join(u.path for u in ts[:3])}{', ...' if len(ts) > 3 else ''}); "
            "add rename rules for them"))
    s_seq = [u for u in su if ssig[u.path] not in uneven]
    t_seq = [u for u in tu if tsig[u.path] not in uneven]
    if not source_ordered:
        ok = _by_signature(s_seq, t_seq, ssig, tsig, out)
    else:
        # 2. align the sequences by signature, as a diff aligns lines
        matcher = difflib.SequenceMatcher(None, [ssig[u.path] for u in s_seq], [tsig[u.path] for u in t_seq],
                                          autojunk=False)
        candidates: list[tuple[Unit, Unit, int]] = []
        for i, j, n in matcher.get_matching_blocks():
            for d in range(n):
                candidates.append((s_seq[i + d], t_seq[j + d], n))
        ok = _checked_siblings(candidates, s_seq, t_seq, ssig, tsig, out)
    # 3. never across subtrees: the highest ancestor whose tensors went somewhere decides, and no
    # module goes where a sibling subtree of its own went
    kept, refused = ok, []
    for _ in range(3):
        pairs_now = dict(anchors)
        for s, t, _, _ in kept:
            for (k, _, _), (tk, _, _) in zip(s.tensors, t.tensors):
                pairs_now[k] = tk
        images, back = _Images(pairs_now), _Images({v: k for k, v in pairs_now.items()})
        bad = {id(item): why for item in kept if (why := _subtree_check(item[0], item[1], images, back))}
        if not bad:
            break
        refused += [(item, bad[id(item)]) for item in kept if id(item) in bad]
        kept = [item for item in kept if id(item) not in bad]
    for (s, t, _, _), problem in refused:
        out.ambiguous.append(Ambiguity(tuple(k for k, _, _ in s.tensors), tuple(k for k, _, _ in t.tensors),
                                       f"{s.describe()} -> {t.describe()}: same shapes, but {problem}; "
                                       "not guessed (add a rename rule to pair them)"))
    final = kept
    # 4. tensors inside each unit pair
    for s, t, n, why in final:
        paired = _inside(s, t)
        if isinstance(paired, str):
            out.ambiguous.append(Ambiguity(tuple(k for k, _, _ in s.tensors), tuple(k for k, _, _ in t.tensors),
                                           f"{s.describe()} -> {t.describe()}: {paired}"))
            continue
        sim = difflib.SequenceMatcher(None, s.path, t.path).ratio()
        conf = round(min(0.99, 0.7 + 0.2 * sim + (0.05 if n > 1 else 0.0)), 2)
        for sk, tk in paired:
            flip = t.path in transposed and _leaf(tk) == "weight" and len(_shape_of(t, tk)) == 2
            reason = why
            if flip:
                reason += "; the source stores this weight [in, out] (Conv1D): transposed"
            out.pairs.append(Pairing(sk, tk, s.path, t.path, Transform("transpose") if flip else None, conf, reason))
    return out


def _checked_siblings(candidates: list[tuple[Unit, Unit, int]], s_seq: list[Unit], t_seq: list[Unit],
                      ssig: Mapping[str, tuple], tsig: Mapping[str, tuple], out: Matching
                      ) -> list[tuple[Unit, Unit, int, str]]:
    """Aligned pairs whose same-shaped siblings agree (by names, indices or module order)."""
    ok: list[tuple[Unit, Unit, int, str]] = []
    for s, t, n in candidates:
        why = _sibling_check(s, t, s_seq, t_seq, ssig, tsig)
        if why.startswith("refused:"):
            out.ambiguous.append(Ambiguity(tuple(k for k, _, _ in s.tensors), tuple(k for k, _, _ in t.tensors),
                                           f"{s.describe()} -> {t.describe()}: {why[len('refused: '):]}"))
            continue
        ok.append((s, t, n, why))
    return ok


def _skeleton(path: str) -> str:
    return ".".join("#" if p.isdigit() else p for p in path.split("."))


def _by_signature(s_seq: list[Unit], t_seq: list[Unit], ssig: Mapping[str, tuple], tsig: Mapping[str, tuple],
                  out: Matching) -> list[tuple[Unit, Unit, int, str]]:
    """Pairs from a source whose order is not its module order (a file sorted by name).

    Order cannot be trusted, so a signature pairs only where nothing has to be guessed: one module
    of it on each side, or modules that differ only by their indices (``layer.#.ffn``) on each side,
    paired in index order.
    """
    groups_s: dict[tuple, list[Unit]] = {}
    groups_t: dict[tuple, list[Unit]] = {}
    for u in sorted(s_seq, key=lambda u: natural_key(u.path)):
        groups_s.setdefault(ssig[u.path], []).append(u)
    for u in t_seq:
        groups_t.setdefault(tsig[u.path], []).append(u)
    ok: list[tuple[Unit, Unit, int, str]] = []
    for sig, ss in groups_s.items():
        ts = groups_t.get(sig)
        if not ts:
            continue
        if len(ss) == 1:
            ok.append((ss[0], ts[0], 1, f"the only module holding {_show(sig)} on each side"))
            continue
        if len({_skeleton(u.path) for u in ss}) == 1 and len({_skeleton(u.path) for u in ts}) == 1:
            ok += [(s, t, len(ss), f"{len(ss)} modules holding {_show(sig)}, paired in index order")
                   for s, t in zip(ss, ts)]
            continue
        out.ambiguous.append(Ambiguity(
            tuple(k for u in ss for k, _, _ in u.tensors), tuple(k for u in ts for k, _, _ in u.tensors),
            f"{len(ss)} source and {len(ts)} target modules hold {_show(sig)} ({', '.join(u.path for u in ss[:3])}"
            f"{', ...' if len(ss) > 3 else ''} / {', '.join(u.path for u in ts[:3])}{', ...' if len(ts) > 3 else ''}), "
            "and the source's order is not its module order (a file sorted by name): not guessed — add rename "
            "rules, or plan from a state dict or torch file, which keep module order"))
    return ok


def _shape_of(unit: Unit, key: str) -> tuple[int, ...]:
    return next(s for k, s, _ in unit.tensors if k == key)


def _sibling_check(s: Unit, t: Unit, s_seq: list[Unit], t_seq: list[Unit], ssig: Mapping[str, tuple],
                   tsig: Mapping[str, tuple]) -> str:
    """Why the alignment may pair ``s`` with ``t`` among same-shaped siblings, or ``"refused: ..."``."""
    ss = [u for u in s_seq if u.parent == s.parent and ssig[u.path] == ssig[s.path]]
    ts = [u for u in t_seq if u.parent == t.parent and tsig[u.path] == tsig[t.path]]
    sig = _show(ssig[s.path])
    if len(ss) == 1 and len(ts) == 1:
        return f"aligned by module signature ({sig}) with the modules around it"
    if _numeric([u.name for u in ss]) and _numeric([u.name for u in ts]):
        return f"aligned by module signature ({sig}), indices in order"
    names = _by_names([u.name for u in ss], [u.name for u in ts])
    if names is None:
        return f"aligned by module signature ({sig}), in module order among same-shaped siblings"
    if names.get(s.name) == t.name:
        return f"aligned by module signature ({sig}); {s.name!r} ~ {t.name!r} among same-shaped siblings"
    return (f"refused: module order pairs {s.name!r} with {t.name!r}, the names with {names.get(s.name)!r}; "
            "not guessed")


class _Images:
    """Where each subtree of one side went on the other: for every path, its pairs' module paths."""

    def __init__(self, pairs: Mapping[str, str]) -> None:
        self.under: dict[str, list[tuple[str, str]]] = {}
        self.children: dict[str, set[str]] = {}
        for k, v in pairs.items():
            mod, other = k.rpartition(".")[0], v.rpartition(".")[0]
            segs = mod.split(".") if mod else []
            for d in range(len(segs) + 1):
                path = ".".join(segs[:d])
                self.under.setdefault(path, []).append((k, other))
                if d:
                    self.children.setdefault(".".join(segs[:d - 1]), set()).add(path)

    def common(self, path: str, own: Collection[str] = ()) -> tuple[str | None, int]:
        """The deepest path all of ``path``'s pairs went under, and from how many of its children."""
        got = [(k, o) for k, o in self.under.get(path, []) if k not in own]
        if not got:
            return None, 0
        kids = {k[len(path) + 1:].split(".", 1)[0] if path else k.split(".", 1)[0] for k, _ in got
                if "." in (k[len(path) + 1:] if path else k)}
        return _common([o for _, o in got]), len(kids)

    def majority(self, path: str, own: Collection[str] = ()) -> str | None:
        """The deepest path more than half of ``path``'s pairs went under."""
        got = [o for k, o in self.under.get(path, []) if k not in own]
        if not got:
            return None
        prefix: list[str] = []
        while True:
            counts: dict[str, int] = {}
            for o in got:
                segs = o.split(".") if o else []
                if len(segs) > len(prefix) and segs[:len(prefix)] == prefix:
                    counts[segs[len(prefix)]] = counts.get(segs[len(prefix)], 0) + 1
            if not counts:
                break
            seg, n = max(counts.items(), key=lambda kv: kv[1])
            if n * 2 <= len(got):
                break
            prefix.append(seg)
        return ".".join(prefix)


def _subtree_check(s: Unit, t: Unit, images: _Images, back: _Images) -> str:
    """Why pairing ``s`` with ``t`` would cross subtrees, or ``""`` when it does not."""
    own = {k for k, _, _ in s.tensors}
    town = {k for k, _, _ in t.tensors}
    return (_outside(s.path, t.path, images, own) or _outside(t.path, s.path, back, town, forward=False)
            or _in_a_sibling(s.path, t.path, images, own))


def _outside(path: str, other: str, images: _Images, own: Collection[str], *, forward: bool = True) -> str:
    """The highest ancestor of ``path`` whose paired tensors (from two or more of its children)
    all went under one subtree of the other side: ``other`` must lie in it."""
    segs = path.split(".") if path else []
    for depth in range(len(segs)):
        anc = ".".join(segs[:depth])
        image, kids = images.common(anc, own)
        if image is None or kids < 2:
            continue
        if _under(other, image):
            return ""
        side, there = ("source", "target") if forward else ("target", "source")
        return (f"the {side}'s other tensors under {anc or '<root>'!r} went under {image!r} on the {there} "
                f"side, and {other!r} is outside it")
    return ""


def _in_a_sibling(path: str, other: str, images: _Images, own: Collection[str]) -> str:
    """Whether ``other`` lies where a sibling subtree of one of ``path``'s ancestors went (layer 4's
    block), while that ancestor went elsewhere (layer 3's)."""
    segs = path.split(".")
    for d in range(len(segs) - 1, 0, -1):
        anc, parent = ".".join(segs[:d]), ".".join(segs[:d - 1])
        mine = images.majority(anc, own)
        if mine is not None and _under(other, mine):
            return ""
        whole = images.majority(parent, own)
        for sib in images.children.get(parent, ()):
            if sib == anc:
                continue
            theirs = images.majority(sib)
            if not theirs or theirs == whole or (whole is not None and not _under(theirs, whole)):
                continue  # not a subtree of its own there
            if _under(other, theirs) and (mine is None or not _under(mine, theirs)):
                return (f"{other!r} lies under {theirs!r}, where the source's {sib!r} went, while "
                        f"{anc!r} went under {mine!r}")
    return ""


def _inside(s: Unit, t: Unit) -> list[tuple[str, str]] | str:
    """Pair the tensors of two units of one signature: standard leaves by name, others by shape, then name."""
    pairs: list[tuple[str, str]] = []
    t_std = {_leaf(k): k for k, _, _ in t.tensors if _leaf(k) in _STANDARD}
    s_loose: dict[tuple, list[str]] = {}
    t_loose: dict[tuple, list[str]] = {}
    for k, shape, dtype in s.tensors:
        if _leaf(k) in _STANDARD:
            pairs.append((k, t_std[_leaf(k)]))
        else:
            s_loose.setdefault((shape, _kind(dtype)), []).append(k)
    for k, shape, dtype in t.tensors:
        if _leaf(k) not in _STANDARD:
            t_loose.setdefault((shape, _kind(dtype)), []).append(k)
    for sig, ks in s_loose.items():
        ts = t_loose[sig]
        if len(ks) == 1:
            pairs.append((ks[0], ts[0]))
            continue
        names = _by_names([_leaf(k) for k in ks], [_leaf(k) for k in ts])
        if names is None:
            return (f"{len(ks)} tensors of shape {list(sig[0])} on each side ({', '.join(map(_leaf, ks))} / "
                    f"{', '.join(map(_leaf, ts))}) and their names do not say which is which; not guessed")
        by_leaf = {_leaf(k): k for k in ts}
        pairs += [(k, by_leaf[names[_leaf(k)]]) for k in ks]
    return pairs
