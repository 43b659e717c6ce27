"""Small facts about tensors that several modules need: one answer each.

Nothing here imports torch at module level: ``is_dtensor`` looks at the class name before it
imports ``torch.distributed.tensor``, so a plain tensor costs no distributed import.
"""

from __future__ import annotations

from typing import Any

__all__ = ["is_dtensor", "dtype_name"]


def _dtensor_class() -> type | None:
    """``torch.distributed.tensor.DTensor`` where this torch build has it, else ``None``."""
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # torch built without distributed support
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` (a Parameter wrapping one included)."""
    if not any(cls.__name__ == "DTensor" for cls in type(t).__mro__):
        return False
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def dtype_name(dtype: Any) -> str:
    """``torch.float32`` -> ``"float32"`` (a name already plain is returned as it is)."""
    return str(dtype).removeprefix("torch.")
