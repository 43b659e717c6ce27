"""The write kernel: a model's tensor slots, and writes into them that are checked first and all or nothing.

`slots_of` maps names to the tensors they register (tied names share one slot); `check_writes`
checks values against slots; `write_all` copies them in, restoring on failure, with Ctrl-C held
(`uninterrupted`) and inference tensors written in their mode (`write_mode`). The memory
checks (`Memory`, `overlapping_groups`, `find_clashes`, `unwritable`) refuse writes whose
outcome would depend on their order. `registrations`, `replace_parameter` and `materialize`
swap Parameter objects wherever they are registered (ties kept). Used by `assign_`, `restore_`,
`init_`, `cast_`, the loads and the sharded load.
"""

from __future__ import annotations

import bisect
import contextlib
import difflib
import itertools
import signal
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import AssignError

__all__ = ["Memory", "Registrations", "Slot", "Write", "check_writes", "copy_detached", "find_clashes",
           "materialize", "may_fail", "overlapping_groups", "refuse", "registrations", "replace_parameter",
           "same_value", "same_view", "slots_of", "uninterrupted", "unwritable", "write_all", "write_mode"]


@dataclass(frozen=True)
class Slot:
    """One tensor of the model and every name it is registered under (more than one when tied)."""

    names: tuple[str, ...]
    tensor: torch.Tensor
    is_buffer: bool


Registrations = dict[int, list[tuple[nn.Module, str]]]


def registrations(model: nn.Module) -> Registrations:
    """Every (module, attribute) registering each Parameter object, by object id."""
    out: Registrations = {}
    for mod in model.modules():
        for attr, param in mod._parameters.items():
            if param is not None:
                out.setdefault(id(param), []).append((mod, attr))
    return out


def replace_parameter(regs: Registrations, old: torch.Tensor, new: nn.Parameter, *,
             fallback: list[tuple[nn.Module, str]] | None = None) -> None:
    """Put ``new`` wherever the Parameter ``old`` is registered (ties kept), and track it there."""
    for mod, attr in regs.get(id(old), fallback or []):
        mod._parameters[attr] = new
    regs[id(new)] = regs.pop(id(old), fallback or [])


def materialize(regs: Registrations, old: torch.Tensor, device: Any) -> nn.Parameter:
    """An uninitialized Parameter on ``device`` in place of the meta Parameter ``old``, wherever it is."""
    new = nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device=device), requires_grad=old.requires_grad)
    replace_parameter(regs, old, new)
    return new


def slots_of(model: nn.Module, *, buffers: bool = True, persistent_only: bool = False) -> dict[str, Slot]:
    """Map every parameter (and buffer) name to its slot; tied names map to one shared slot.

    Names come in ``state_dict`` order: each module's parameters, then its buffers, then its children.
    """
    found: dict[int, tuple[list[str], torch.Tensor, bool]] = {}
    order: dict[str, None] = {}  # an ordered set
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        entries = [(k, t, False) for k, t in mod._parameters.items()]
        if buffers:
            entries += [
                (k, t, True) for k, t in mod._buffers.items()
                if not (persistent_only and k in mod._non_persistent_buffers_set)
            ]
        for short, tensor, is_buffer in entries:
            name = prefix + short
            if tensor is None or name in order:
                continue
            found.setdefault(id(tensor), ([], tensor, is_buffer))[0].append(name)
            order[name] = None
    slots = {id_: Slot(tuple(names), tensor, is_buffer) for id_, (names, tensor, is_buffer) in found.items()}
    by_name = {name: slots[id_] for id_, (names, _, _) in found.items() for name in names}
    return {name: by_name[name] for name in order}


def _fmt(shape: torch.Size | tuple[int, ...]) -> str:
    return str(tuple(shape))


def same_value(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b or same_view(a, b):  # e.g. both names of a tied tensor in a state dict
        return True
    if a.shape != b.shape or a.dtype != b.dtype or a.is_meta or b.is_meta:
        return False
    return torch.equal(a, b.to(a.device))


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same elements of the same memory."""
    return (
        a.layout == b.layout == torch.strided and a.device == b.device and not a.is_meta
        and a.dtype == b.dtype and a.shape == b.shape
        and a.stride() == b.stride() and a.data_ptr() == b.data_ptr()
    )


@dataclass
class Write:
    slot: Slot
    value: torch.Tensor
    given: list[str]


def check_writes(
    model: nn.Module,
    mapping: Mapping[str, Any],
    *,
    strict: bool,
    slots: dict[str, Slot] | None = None,
    what: str = "value",
) -> tuple[list[Write], list[tuple[str, str]], list[str]]:
    """Check every entry of ``mapping`` against ``model``; return the writes, skips and problems."""
    slots = slots_of(model) if slots is None else slots
    writes: dict[int, Write] = {}
    skipped: list[tuple[str, str]] = []
    problems: list[str] = []
    for name, value in mapping.items():
        slot = slots.get(name)
        if slot is None:
            if strict:
                close = difflib.get_close_matches(name, list(slots), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{name!r}: no such parameter or buffer in {type(model).__name__}{hint}")
            else:
                skipped.append((name, "not in the model"))
            continue
        if not isinstance(value, torch.Tensor):
            try:
                value = torch.as_tensor(value)
            except (TypeError, ValueError, RuntimeError) as e:
                problems.append(f"{name!r}: the {what} is a {type(value).__name__}, not a tensor ({e})")
                continue
        target = slot.tensor
        if value.layout != torch.strided:
            problems.append(f"{name!r}: the {what} is a {value.layout} tensor; pass a dense one")
        elif value.is_meta:
            problems.append(f"{name!r}: the {what} is on the meta device and holds no data")
        elif target.is_meta:
            problems.append(
                f"{name!r}: the model's tensor is on the meta device; materialize it first "
                "(e.g. init_(model, rules, device='cpu'))"
            )
        elif value.shape != target.shape:
            problems.append(f"{name!r}: expected shape {_fmt(target.shape)}, got {_fmt(value.shape)}")
        elif not torch.can_cast(value.dtype, target.dtype):
            problems.append(
                f"{name!r}: cannot cast {value.dtype} to the model's {target.dtype} without losing "
                f"values; convert it explicitly if that is intended"
            )
        write = writes.get(id(target))
        if write is None:
            writes[id(target)] = Write(slot, value, [name])
        elif same_value(write.value, value):
            write.given.append(name)
        else:
            problems.append(
                f"{name!r} and {write.given[0]!r} are tied (one tensor) but were given different {what}s"
            )
    problems += unwritable((w.given[0], w.slot.tensor) for w in writes.values())
    if not problems:
        problems += find_clashes([(w.given[0], w.slot.tensor, w.value) for w in _in_order(list(writes.values()))])
    return list(writes.values()), skipped, problems


def _in_order(writes: list[Write]) -> list[Write]:
    """The order `write_all` writes in: first those that may fail (see `may_fail`), then the rest."""
    return ([w for w in writes if may_fail(w.value, w.slot.tensor)]
            + [w for w in writes if not may_fail(w.value, w.slot.tensor)])


def refuse(problems: list[str], total: int, *, verb: str = "assign") -> None:
    lines = "\n".join(f"  - {p}" for p in problems)
    raise AssignError(
        f"cannot {verb}: {len(problems)} problem(s) among {total} entries; nothing was written\n{lines}",
        problems=tuple(problems),
    )


def write_all(writes: list[Write]) -> None:
    """Copy every value into its slot; on any failure put back what was already written."""
    targets = [w.slot.tensor for w in writes]
    memory = Memory(targets)
    for w in writes:
        if same_view(w.value, w.slot.tensor):
            w.value = w.slot.tensor  # already in place: copying a tensor onto itself is a no-op
        elif memory.overlaps(w.value):
            # e.g. swapping two weights: the second read would see the first write
            w.value = w.value.clone()
    # A checked copy between plain tensors cannot fail; some others can (see `may_fail`). Those
    # go first, each target backed up before it is written, so that a failure finds only
    # backed-up writes done and the rest need no backup. Ctrl-C waits for the last write.
    ordered = _in_order(writes)
    backed_up = {id(w) for w in ordered if may_fail(w.value, w.slot.tensor)}
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    current = ""
    try:
        with uninterrupted(), write_mode(targets):
            for w in ordered:
                current = w.given[0]
                if w.value is w.slot.tensor:
                    continue
                if id(w) in backed_up:
                    saved.append((w.slot.tensor, copy_detached(w.slot.tensor, None)))
                w.slot.tensor.copy_(w.value)
    except Exception as e:
        with write_mode(targets):
            for target, old in saved:
                target.copy_(old)
        raise AssignError(
            f"writing {current!r} failed ({type(e).__name__}: {e}); every entry written before it "
            "was restored, the model is unchanged",
            problems=(f"{current!r}: {e}",),
        ) from e


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block is done, then deliver it: no write is left half done.

    Signals reach only the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)


def may_fail(value: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether copying a checked ``value`` into ``target`` can fail in a way a backup would undo.

    Between plain strided tensors it cannot, on one device or into an accelerator (a transfer
    there fails only with the device, and a backup on it with it; backing up a GPU model would
    also double its memory). Subclasses, meta values and transfers into host memory from a
    device may fail, and a backup in host memory survives them.
    """
    plain = (torch.Tensor, nn.Parameter)
    return (type(value) not in plain or type(target) not in plain or value.is_meta
            or value.layout != torch.strided or target.layout != torch.strided
            or (value.device != target.device and target.device.type == "cpu"))


def copy_detached(tensor: torch.Tensor, device: str | torch.device | None) -> torch.Tensor:
    """A detached copy of ``tensor`` on ``device`` (``None``: its own), in fresh memory."""
    out = torch.empty_like(tensor, device=device or tensor.device, requires_grad=False)
    out.copy_(tensor.detach())
    return out


# -- what memory a write touches ------------------------------------------------------------------
def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory a write lands in (a DTensor's local shard)."""
    if type(tensor) in (torch.Tensor, nn.Parameter):
        return tensor
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _span(tensor: torch.Tensor) -> tuple[torch.device, int, int] | None:
    """``(device, first byte, end byte)`` of the memory a dense tensor's elements lie in; ``None``: none."""
    if tensor.layout != torch.strided or tensor.is_meta:
        return None
    try:
        start = tensor.data_ptr()
    except RuntimeError:  # a wrapper subclass with no memory of its own
        return None
    if tensor.is_contiguous():  # the common case, without a Python loop over dimensions
        nbytes = tensor.nbytes
        return (tensor.device, start, start + nbytes) if nbytes else None
    if tensor.numel() == 0:
        return None
    extent = sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))
    return tensor.device, start, start + (extent + 1) * tensor.element_size()


class Memory:
    """The bytes some tensors lie in, asked quickly whether another tensor touches any of them.

    Overlap is judged on byte ranges, so views, slices and a second storage object over the
    same memory all count; a strided view may be reported where its elements miss (a needless
    copy at worst, never a missed alias).
    """

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        by_device: dict[torch.device, list[tuple[int, int]]] = {}
        for t in tensors:
            span = _span(_local(t))
            if span is not None:
                by_device.setdefault(span[0], []).append(span[1:])
        self._index: dict[torch.device, tuple[list[int], list[int]]] = {}
        for device, spans in by_device.items():
            spans.sort()
            # reach[i]: the furthest end among the first i + 1 ranges, so one bisect answers
            self._index[device] = ([s for s, _ in spans], list(itertools.accumulate((e for _, e in spans), max)))

    def overlaps(self, tensor: torch.Tensor) -> bool:
        span = _span(_local(tensor))
        if span is None or span[0] not in self._index:
            return False
        starts, reach = self._index[span[0]]
        i = bisect.bisect_left(starts, span[2]) - 1
        return i >= 0 and reach[i] > span[1]


_EXACT_OVERLAP_LIMIT = 1 << 22  # elements: beyond this an unprovable layout counts as overlapping


def _elements_overlap(tensor: torch.Tensor) -> bool:
    """Whether two elements of a dense tensor share memory (an expanded or ``as_strided`` view)."""
    if tensor.is_contiguous():
        return False
    dims = sorted((s, n) for n, s in zip(tensor.shape, tensor.stride()) if n > 1)
    if any(s == 0 for s, _ in dims):
        return True
    reach = 0
    for s, n in dims:  # each stride clears everything the smaller ones reach: provably apart
        if s <= reach:
            break
        reach += s * (n - 1)
    else:
        return False
    extent = sum(s * (n - 1) for s, n in dims)
    if tensor.numel() > _EXACT_OVERLAP_LIMIT or extent >= 4 * _EXACT_OVERLAP_LIMIT:
        return True
    offsets = torch.arange(extent + 1).as_strided(tensor.shape, tensor.stride())
    return bool(offsets.unique().numel() < tensor.numel())


class _Mappings:
    """This process's memory mappings (Linux ``/proc/self/maps``), to find read-only ones."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.rows: list[tuple[int, int, bool]] = []
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    addresses, perms = line.split(None, 2)[:2]
                    lo, hi = (int(a, 16) for a in addresses.split("-"))
                    self.starts.append(lo)
                    self.rows.append((lo, hi, "w" in perms))
        except (OSError, ValueError):  # not Linux, or unreadable: nothing is known to be read-only
            self.starts, self.rows = [], []

    def read_only(self, start: int, end: int) -> bool:
        """Whether a mapping covering part of ``[start, end)`` refuses writes."""
        i = bisect.bisect_right(self.starts, start) - 1
        while 0 <= i < len(self.rows) and self.rows[i][0] < end:
            lo, hi, writable = self.rows[i]
            if hi > start and not writable:
                return True
            i += 1
        return False


def unwritable(targets: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """One line (name, shape, why, fix) per tensor that cannot take a value in place.

    Inference tensors are not listed: `write_mode` writes them under ``torch.inference_mode``.
    """
    problems: list[str] = []
    mappings: _Mappings | None = None
    seen: set[int] = set()
    for name, tensor in targets:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        t = _local(tensor)
        head = f"{name!r} {_fmt(t.shape)}"
        if t.is_meta:
            continue  # said elsewhere, with what to do about it
        if t.layout != torch.strided:
            problems.append(f"{head}: a {t.layout} tensor cannot be written in place; make the model's "
                            "tensor dense first (e.g. module.<name> = nn.Parameter(t.to_dense()))")
        elif _elements_overlap(t):
            problems.append(f"{head}: several of its elements share one memory location (strides "
                            f"{_fmt(t.stride())}: an expanded or broadcast tensor), so no value can be "
                            "written into it in place; give it memory of its own first, e.g. "
                            "module.<name> = nn.Parameter(t.contiguous()) (a new object: rebuild optimizers)")
        elif t.device.type == "cpu" and (span := _span(t)) is not None:
            mappings = mappings or _Mappings()
            if mappings.read_only(span[1], span[2]):
                problems.append(f"{head}: its memory is mapped read-only (e.g. a read-only numpy memmap), "
                                "writing would crash the process; copy it into writable memory first "
                                "(t.clone())")
    return problems


def write_mode(targets: Iterable[torch.Tensor]) -> contextlib.AbstractContextManager[Any]:
    """``no_grad``, or ``inference_mode`` where a target is an inference tensor.

    A tensor created under ``torch.inference_mode()`` takes in-place writes only inside it;
    ordinary tensors take them in either, and stay ordinary.
    """
    if any(t.is_inference() for t in targets if isinstance(t, torch.Tensor)):
        return torch.inference_mode()
    return torch.no_grad()


def find_clashes(writes: list[tuple[str, torch.Tensor, Any]]) -> list[str]:
    """Targets that share memory with another target and would not hold the value written to them.

    Two Parameters over one memory (``nn.Parameter(p.data)``, a buffer that views a weight) are
    not a tie: writing both writes the memory twice, and the last write wins wherever they
    overlap. The writes of each group of overlapping targets are replayed, in ``writes`` order,
    on a scratch copy of their bytes; a target left holding anything but its value is listed.
    Targets apart in memory (nearly all) cost one sort.
    """
    problems: list[str] = []
    for group in overlapping_groups([t for _, t, _ in writes]):
        problems += _replay([writes[i] for _, i in group], [span for span, _ in group])
    return problems


def overlapping_groups(tensors: list[torch.Tensor]) -> list[list[tuple[tuple[torch.device, int, int], int]]]:
    """Groups of tensors whose memory overlaps, as ``(span, index)`` in index order; one sort."""
    by_device: dict[torch.device, list[tuple[tuple[torch.device, int, int], int]]] = {}
    for i, t in enumerate(tensors):
        if (span := _span(_local(t))) is not None:
            by_device.setdefault(span[0], []).append((span, i))
    groups: list[list[tuple[tuple[torch.device, int, int], int]]] = []
    for spans in by_device.values():
        spans.sort(key=lambda item: item[0][1:])
        reach = -1
        for span, i in spans:
            if span[1] < reach:
                groups[-1].append((span, i))
                reach = max(reach, span[2])
            else:
                groups.append([(span, i)])
                reach = span[2]
    return [sorted(g, key=lambda item: item[1]) for g in groups if len(g) > 1]


def _replay(writes: list[tuple[str, torch.Tensor, Any]], spans: list[tuple[torch.device, int, int]]) -> list[str]:
    """`find_clashes` for one group of overlapping targets, given in write order with their spans."""
    targets = [_local(t) for _, t, _ in writes]
    base = min(s[1] for s in spans) // 64 * 64
    scratch = torch.empty(max(s[2] for s in spans) - base, dtype=torch.uint8, device=targets[0].device)
    names = [name for name, _, _ in writes]
    try:
        views = []
        for t, span in zip(targets, spans):
            raw = scratch[span[1] - base:span[2] - base].view(t.dtype)
            views.append(raw.as_strided(t.shape, t.stride()))
        with torch.no_grad():
            for view, (_, _, value) in zip(views, writes):
                view.copy_(torch.as_tensor(value).detach())
    except RuntimeError as e:  # bytes that no dtype view can lie on: cannot be shown safe
        return [f"{', '.join(map(repr, names))}: different tensors over overlapping memory, and the writes "
                f"cannot be checked ({e}); give each memory of its own or tie them (weightsmith.tie_)"]
    problems = []
    for name, view, (_, _, value) in zip(names, views, writes):
        expected = torch.as_tensor(value).detach().to(device=view.device, dtype=view.dtype)
        if not (torch.equal(view, expected) or _nan_equal(view, expected)):
            others = [n for n in names if n != name]
            problems.append(f"{name!r} shares memory with {', '.join(map(repr, others))} (different tensors, "
                            f"not a tie), and the values given to them disagree where they overlap: writing "
                            f"both would leave {name!r} wrong; give them agreeing values, give each memory of "
                            "its own, or tie them (weightsmith.tie_)")
    return problems


def _nan_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not (a.is_floating_point() or a.is_complex()):
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())
