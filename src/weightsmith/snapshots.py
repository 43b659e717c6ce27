"""True copies of a model's state, and putting them back.

``model.state_dict()`` returns tensors that alias the live parameters, so a "saved" state dict
changes as the model trains. A `Snapshot` owns its memory; `restore_` writes it back through the
checked, all-or-nothing machinery of `weightsmith.assign`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .assign import AssignReport, writes_report
from ._slots import check_writes, copy_detached, refuse, slots_of, write_all
from .errors import ModelError

__all__ = ["Snapshot", "snapshot", "restore_"]


class Snapshot(Mapping[str, torch.Tensor]):
    """A detached copy of a model's parameters (and buffers), usable wherever a state dict is.

    Keys are the model's ``state_dict`` keys; tied names map to one shared tensor, stored once.
    Save ``dict(snap)``: a plain dict of tensors reloads with ``torch.load(weights_only=True)``.

    Attributes:
        buffers: whether the snapshot holds the model's (persistent) buffers too.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, buffers: bool) -> None:
        self._tensors = dict(tensors)
        self.buffers = buffers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def nbytes(self) -> int:
        """Bytes held, counting each tied tensor once."""
        unique = {id(t): t for t in self._tensors.values()}
        return sum(t.nbytes for t in unique.values())

    def __repr__(self) -> str:
        devices = sorted({str(t.device) for t in self._tensors.values()})
        return f"Snapshot({len(self)} tensors, {self.nbytes:,} bytes, on {', '.join(devices) or 'nothing'})"


def snapshot(
    model: nn.Module, *, device: str | torch.device | None = "cpu", buffers: bool = True
) -> Snapshot:
    """Copy a model's parameters (and persistent buffers) into memory the model does not share.

    Args:
        model: the model to copy.
        device: where the copies live; ``None`` keeps each on its tensor's own device.
        buffers: include persistent buffers (e.g. BatchNorm running statistics).

    Returns:
        A `Snapshot`: a mapping of ``state_dict`` names to detached tensors. Training the model
        afterwards leaves it unchanged.

    Raises:
        ModelError: some tensors are on the meta device and hold no values to copy.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> snap = snapshot(model)
    >>> with torch.no_grad(): _ = model[0].weight.add_(1)
    >>> restore_(model, snap).written[:2]
    ('0.weight', '0.bias')
    """
    slots = slots_of(model, buffers=buffers, persistent_only=True)
    meta = [name for name, slot in slots.items() if slot.tensor.is_meta]
    if meta:
        raise ModelError(
            f"cannot snapshot {len(meta)} tensor(s) on the meta device, they hold no values: "
            f"{', '.join(meta[:10])}{' ...' if len(meta) > 10 else ''}; materialize them first"
        )
    copies: dict[int, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, slot in slots.items():
            copy = copies.get(id(slot.tensor))
            if copy is None:
                copy = copies[id(slot.tensor)] = copy_detached(slot.tensor, device)
            tensors[name] = copy
    return Snapshot(tensors, buffers=buffers)


def restore_(model: nn.Module, snap: Mapping[str, torch.Tensor], *, strict: bool = True) -> AssignReport:
    """Write a snapshot (or any state dict) back into the model, in place, all or nothing.

    Parameter objects stay the same ones; values are checked first exactly as in `assign_`.

    Args:
        model: the model to restore.
        snap: a `Snapshot`, or any mapping of names to tensors.
        strict: every name must fit the model, and every parameter (and persistent buffer, when
            ``snap`` holds buffers) must be covered; with ``False``, unknown names are skipped and
            uncovered tensors left as they are, both reported.

    Returns:
        An `AssignReport`.

    Raises:
        AssignError: listing every name that does not fit (unknown, missing, wrong shape or
            dtype); nothing was written.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> snap = snapshot(model)
    >>> len(restore_(model, snap).written)
    4
    """
    with_buffers = getattr(snap, "buffers", True)
    slots = slots_of(model, buffers=True)
    writes, skipped, problems = check_writes(model, snap, strict=strict, slots=slots)
    covered = {id(w.slot.tensor) for w in writes}
    expected = slots_of(model, buffers=with_buffers, persistent_only=True)
    missing = [n for n, s in expected.items() if id(s.tensor) not in covered and n == s.names[0]]
    if strict:
        problems += [f"{n!r}: missing from the snapshot" for n in missing]
    else:
        skipped += [(n, "not in the snapshot") for n in missing]
    if problems:
        refuse(problems, len(snap), verb="restore")
    with torch.no_grad():
        write_all(writes)
    return writes_report(writes, skipped)
