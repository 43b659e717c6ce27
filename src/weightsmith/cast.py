"""Change the dtype of part of a live model in place, keeping norm layers in float32."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import selectors
from ._result import Result
from ._slots import slots_of
from .errors import ModelError
from .selectors import Selector

__all__ = ["CastReport", "cast_", "NORM_TYPES"]

# Layers whose statistics overflow or lose precision in half precision. Models that bring their
# own norm classes (e.g. ``LlamaRMSNorm``, ``T5LayerNorm``) are recognised by the class name.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)
_NORM_NAME = re.compile(r"Norm(\d+d)?$")


@dataclass(frozen=True)
class CastReport(Result):
    """What `cast_` changed.

    Attributes:
        dtype: the dtype cast to.
        cast: ``(name, dtype before)`` for each tensor cast; tied names all appear.
        kept: ``(name, reason)`` for selected tensors left as they were.
    """

    SCHEMA = "weightsmith.cast/1"

    dtype: str
    cast: tuple[tuple[str, str], ...]
    kept: tuple[tuple[str, str], ...] = ()

    def _rich_(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        summary = f"{len(self.cast)} cast to {self.dtype}, {len(self.kept)} kept"
        table = Table()
        table.add_column("name")
        table.add_column("dtype")
        for name, before in self.cast:
            table.add_row(name, f"{before} → {self.dtype}")
        for name, reason in self.kept:
            table.add_row(name, f"kept: {reason}")
        return Group(Text(summary), table)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) or bool(_NORM_NAME.search(type(module).__name__))


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        found = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(found, torch.dtype):
            raise ModelError(f"unknown dtype {dtype!r}: use e.g. 'float16', 'bfloat16' or torch.float16")
        dtype = found
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelError(f"cast_ changes floating-point precision; {dtype!r} is not a floating-point dtype")
    return dtype


def cast_(
    model: nn.Module,
    dtype: torch.dtype | str,
    *,
    select: Selector | None = None,
    keep_norms: bool = True,
) -> CastReport:
    """Cast floating-point parameters (and buffers) to ``dtype`` in place.

    Each Parameter object stays the same one (its ``.data`` is replaced) and ties stay tied. Tensors
    held by norm layers (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm, or any class
    named ``...Norm``) are kept as they are unless ``keep_norms=False``; integer tensors such as
    ``num_batches_tracked`` are never cast. An existing ``.grad`` is cast along; optimizer state
    is not (build the optimizer after casting).

    Args:
        model: the live model.
        dtype: a floating-point dtype, or its name (``"float16"``, ``"bfloat16"``).
        select: which parameters or buffers (see `weightsmith.selectors`); everything by default.
        keep_norms: leave tensors of norm layers in their dtype.

    Returns:
        A `CastReport` listing what was cast from which dtype, and what was kept and why.

    Raises:
        ModelError: ``dtype`` is not a floating-point dtype.
        SelectorError: ``select`` matched nothing.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    >>> [name for name, _ in cast_(model, torch.float16).cast]
    ['0.weight', '0.bias']
    """
    dtype = _resolve_dtype(dtype)
    slots = slots_of(model, buffers=True)
    names = list(slots) if select is None else selectors.select(model, select, buffers=True)
    norm_held: set[int] = set()
    if keep_norms:
        norm_held = {
            id(t) for mod in model.modules() if _is_norm(mod)
            for t in (*mod._parameters.values(), *mod._buffers.values()) if t is not None
        }
    cast: list[tuple[str, str]] = []
    kept: list[tuple[str, str]] = []
    chosen: dict[int, torch.Tensor] = {}
    for name in names:
        tensor = slots[name].tensor
        before = str(tensor.dtype).removeprefix("torch.")
        if id(tensor) in chosen:
            cast.append((name, before))
        elif not tensor.is_floating_point():
            kept.append((name, f"{before} is not floating point"))
        elif tensor.dtype == dtype:
            kept.append((name, "already in that dtype"))
        elif id(tensor) in norm_held:
            kept.append((name, "norm layer"))
        else:
            chosen[id(tensor)] = tensor
            cast.append((name, before))
    selected = set(names)
    tied_outside = [  # a tie is one tensor: its names outside the selection change too
        (other, before) for name, before in list(cast)
        for other in slots[name].names if other not in selected
    ]
    cast += list(dict.fromkeys(tied_outside))
    _replace_data(list(chosen.values()), dtype)
    return CastReport(str(dtype).removeprefix("torch."), tuple(cast), tuple(kept))


def _replace_data(tensors: list[torch.Tensor], dtype: torch.dtype) -> None:
    """Swap each tensor's data for a cast copy; if any cast fails, swap every one back."""
    done: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    with torch.no_grad():
        try:
            for tensor in tensors:
                grad = tensor.grad if isinstance(tensor, nn.Parameter) else None
                new_data, new_grad = tensor.data.to(dtype), None if grad is None else grad.to(dtype)
                done.append((tensor, tensor.data, grad))
                if grad is not None:
                    tensor.grad = None  # a grad must match its tensor's dtype at every moment
                tensor.data = new_data
                if new_grad is not None:
                    tensor.grad = new_grad
        except Exception as e:
            for tensor, old_data, old_grad in done:
                tensor.grad = None
                tensor.data = old_data
                tensor.grad = old_grad
            raise ModelError(
                f"casting to {dtype} failed ({type(e).__name__}: {e}); every tensor was put back"
            ) from e
