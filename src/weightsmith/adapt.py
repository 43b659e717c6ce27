"""Shape adapters for warm-starting: fit a source tensor to a target of another shape.

Each adapter is named in the plan. They cover the common cases: a classifier head with another
number of classes, a first convolution with another number of input channels, absolute position
embeddings of another length or grid, and a vocabulary embedding that grew or shrank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Adapter", "find_adapter"]


@dataclass(frozen=True)
class Adapter:
    """A named way to turn a source tensor into a target-shaped one."""

    name: str
    description: str
    fn: Callable[[Any, Any], Any]  # (source, target's current value) -> new value

    def __str__(self) -> str:
        return f"adapt:{self.name} ({self.description})"


def find_adapter(name: str, src: tuple[int, ...], tgt: tuple[int, ...]) -> Adapter | None:
    """The adapter that fits ``src`` to ``tgt`` for the tensor called ``name``, if one applies."""
    leaf = name.rsplit(".", 1)[-1]
    lname = name.lower()
    if len(src) != len(tgt) or src == tgt:
        return None
    diff = [i for i, (a, b) in enumerate(zip(src, tgt)) if a != b]
    if "pos" in lname and "embed" in lname or "position" in lname:
        return _positions(src, tgt)
    if diff == [0] and len(src) in (1, 2):
        if "embed" in lname or "wte" in lname or "word" in lname or "token" in lname:
            return Adapter("vocab", f"rows {src[0]}->{tgt[0]}, new rows = mean of the old",
                           lambda s, cur: _rows(s, cur, fill_mean=True))
        return Adapter("rows", f"{leaf} rows {src[0]}->{tgt[0]}, kept {min(src[0], tgt[0])}, "
                       f"{max(tgt[0] - src[0], 0)} from the target's own init",
                       lambda s, cur: _rows(s, cur, fill_mean=False))
    if diff == [1] and len(src) in (3, 4, 5) and leaf == "weight":
        how = "sum" if tgt[1] == 1 else "repeat"
        return Adapter("in_channels", f"input channels {src[1]}->{tgt[1]} ({how})",
                       lambda s, cur: _in_channels(s, tgt[1]))
    return None


def _rows(src: Any, cur: Any, *, fill_mean: bool) -> Any:
    out = cur.detach().to(dtype=src.dtype).clone()
    n = min(src.shape[0], out.shape[0])
    out[:n] = src[:n]
    if fill_mean and out.shape[0] > n:
        out[n:] = src.float().mean(dim=0).to(src.dtype)
    return out


def _in_channels(src: Any, channels: int) -> Any:
    """Sum over channels for one input channel; otherwise repeat cyclically and rescale."""
    import torch

    if channels == 1:
        return src.float().sum(dim=1, keepdim=True).to(src.dtype)
    reps = math.ceil(channels / src.shape[1])
    out = torch.cat([src] * reps, dim=1)[:, :channels]
    return (out.float() * (src.shape[1] / channels)).to(src.dtype)


def _positions(src: tuple[int, ...], tgt: tuple[int, ...]) -> Adapter | None:
    # [L, D] or [1, L, D]: interpolate along L, as a 2-D grid when both lengths are squares
    # (after an optional leading class token), else as a 1-D sequence.
    if src[-1] != tgt[-1] or len(src) not in (2, 3) or (len(src) == 3 and src[0] != tgt[0]):
        return None
    ls, lt = src[-2], tgt[-2]
    for extra in (0, 1):
        gs, gt = math.isqrt(ls - extra), math.isqrt(lt - extra)
        if gs * gs == ls - extra and gt * gt == lt - extra and gs > 1 and gt > 1:
            return Adapter("pos_grid", f"position grid {gs}x{gs}->{gt}x{gt}"
                           + (" (+1 class token)" if extra else "") + ", bicubic",
                           lambda s, cur: _grid(s, extra, gt))
    return Adapter("pos_1d", f"positions {ls}->{lt}, linear", lambda s, cur: _seq(s, lt))


def _grid(src: Any, extra: int, size: int) -> Any:
    import torch
    import torch.nn.functional as F

    flat = src.reshape(-1, src.shape[-2], src.shape[-1])
    head, grid = flat[:, :extra], flat[:, extra:]
    g = math.isqrt(grid.shape[1])
    img = grid.reshape(flat.shape[0], g, g, -1).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(size, size), mode="bicubic", align_corners=False)
    grid = img.permute(0, 2, 3, 1).reshape(flat.shape[0], size * size, -1).to(src.dtype)
    out = torch.cat([head, grid], dim=1)
    return out.reshape(*src.shape[:-2], out.shape[1], src.shape[-1])


def _seq(src: Any, length: int) -> Any:
    import torch.nn.functional as F

    flat = src.reshape(-1, src.shape[-2], src.shape[-1]).permute(0, 2, 1).float()
    out = F.interpolate(flat, size=length, mode="linear", align_corners=True)
    out = out.permute(0, 2, 1).to(src.dtype)
    return out.reshape(*src.shape[:-2], length, src.shape[-1])
