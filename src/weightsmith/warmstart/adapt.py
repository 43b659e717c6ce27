"""Shape adapters for warm-starting: fit a source tensor to a target of another shape.

Each adapter is named in the plan. They cover the common cases: a classifier head with another
number of classes, a first convolution with another number of input channels, absolute position
embeddings of another length or grid, a patch embedding with another patch size, and a vocabulary
embedding that grew or shrank. Position grids and patch kernels are resampled as timm does
(``resample_abs_pos_embed``, ``resample_patch_embed``), so a model warm-started here sees the same
weights as one resized there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Adapter", "find_adapter", "resample_abs_pos_embed", "resample_patch_embed"]


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
    if diff == [2, 3] and len(src) == 4 and "patch" in lname and leaf == "weight":
        size = (tgt[2], tgt[3])
        return Adapter("patch_embed", f"patch kernels {src[2]}x{src[3]}->{size[0]}x{size[1]}, pseudo-inverse of "
                       "the bicubic resize (as timm's resample_patch_embed)",
                       lambda s, cur: resample_patch_embed(s, size))
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
    # [L, D] (a table, as nn.Embedding holds it): interpolate along L as a sequence.
    # [1, L, D]: a square grid after a few prefix tokens (class, register) when both lengths are
    # squares after the same number of them, else a sequence.
    if src[-1] != tgt[-1] or len(src) not in (2, 3) or (len(src) == 3 and src[0] != tgt[0]):
        return None
    ls, lt = src[-2], tgt[-2]
    for extra in range(0, 9) if len(src) == 3 else ():
        gs, gt = math.isqrt(max(ls - extra, 0)), math.isqrt(max(lt - extra, 0))
        if gs * gs == ls - extra and gt * gt == lt - extra and gs > 1 and gt > 1:
            return Adapter("pos_grid", f"position grid {gs}x{gs}->{gt}x{gt}"
                           + (f" (+{extra} class token{'s' if extra > 1 else ''})" if extra else "")
                           + ", bicubic with antialias (as timm's resample_abs_pos_embed)",
                           lambda s, cur: resample_abs_pos_embed(s, (gt, gt), num_prefix_tokens=extra))
    return Adapter("pos_1d", f"positions {ls}->{lt}, linear", lambda s, cur: _seq(s, lt))


def resample_abs_pos_embed(posemb: Any, new_size: tuple[int, int], *, num_prefix_tokens: int = 1) -> Any:
    """Resize a ``[B, prefix + H*W, D]`` position embedding to a new square grid.

    The grid is resampled bicubically with antialiasing (``align_corners=False``) in float32; the
    prefix tokens (class, registers) are kept as they are — timm's ``resample_abs_pos_embed``.
    """
    import torch
    import torch.nn.functional as F

    flat = posemb.reshape(-1, posemb.shape[-2], posemb.shape[-1])
    head, grid = flat[:, :num_prefix_tokens], flat[:, num_prefix_tokens:]
    g = math.isqrt(grid.shape[1])
    img = grid.reshape(flat.shape[0], g, g, -1).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=new_size, mode="bicubic", antialias=True, align_corners=False)
    grid = img.permute(0, 2, 3, 1).reshape(flat.shape[0], new_size[0] * new_size[1], -1).to(posemb.dtype)
    out = torch.cat([head, grid], dim=1)
    return out.reshape(*posemb.shape[:-2], out.shape[1], posemb.shape[-1])


def resample_patch_embed(weight: Any, new_size: tuple[int, int]) -> Any:
    """Resize patch-embedding kernels ``[out, in, h, w]`` to ``new_size`` (FlexiViT's rule).

    With R the bicubic (antialiased) resize of an ``h x w`` patch to ``new_size``, the new kernel
    is ``pinv(R^T) @ k``: a patch resized by R and seen through the new kernel gives the same
    response as the patch through the old one — timm's ``resample_patch_embed``.
    """
    import torch
    import torch.nn.functional as F

    old = tuple(weight.shape[-2:])
    n = old[0] * old[1]
    basis = torch.eye(n, dtype=torch.float32).reshape(n, 1, *old)
    resized = F.interpolate(basis, size=new_size, mode="bicubic", antialias=True, align_corners=False)
    resize = resized.reshape(n, -1).T.double()          # R: [new, old], column i = resized basis i
    pinv = torch.linalg.pinv(resize.T)                  # [new, old]
    flat = weight.reshape(*weight.shape[:-2], n).double()
    out = flat @ pinv.T
    return out.reshape(*weight.shape[:-2], *new_size).to(weight.dtype)


def _seq(src: Any, length: int) -> Any:
    import torch.nn.functional as F

    flat = src.reshape(-1, src.shape[-2], src.shape[-1]).permute(0, 2, 1).float()
    out = F.interpolate(flat, size=length, mode="linear", align_corners=True)
    out = out.permute(0, 2, 1).to(src.dtype)
    return out.reshape(*src.shape[:-2], length, src.shape[-1])
