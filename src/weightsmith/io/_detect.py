"""Naming a checkpoint's format by its content.

The bottom of the format modules: it imports none of the readers (only `safetensors`' header test),
so `sharded` and `dcp` may use `detect` and the file names below without importing back.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointNotFoundError, UnknownFormatError

__all__ = ["detect", "METADATA_NAME", "INDEX_NAMES"]

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
# the names that mark a folder's format; the format modules take them from here
METADATA_NAME = ".metadata"  # torch.distributed.checkpoint's commit marker
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def detect(path: str | Path) -> tuple[str, Path]:
    """The format of ``path`` and the file or folder to read it from.

    Formats: ``safetensors``, ``torch`` (zip or legacy), ``sharded`` (a Hugging Face index),
    ``dcp`` (a torch.distributed.checkpoint folder). A Hub source, ``hf://ORG/NAME[@REV][/PATH]``,
    is fetched first (its weight files only) and named by its local copy.
    """
    from .safetensors import looks_like_safetensors

    if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith("hf:/"):  # hub only when it may be one
        from . import hub

        if hub.is_hub(path):
            path = hub.resolve(path)
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"{p}: no such file or folder")
    if p.is_dir():
        if (p / METADATA_NAME).is_file():
            return "dcp", p
        for name in INDEX_NAMES:
            if (p / name).is_file():
                return "sharded", p / name
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (p / name).is_file():
                return detect(p / name)
        indexes = sorted(p.glob("*.index.json"))
        if len(indexes) == 1:
            return "sharded", indexes[0]
        candidates = sorted(f for f in p.iterdir() if f.is_file()
                            and (f.suffix == ".safetensors" or f.suffix in _TORCH_SUFFIXES))
        if len(candidates) == 1:
            return detect(candidates[0])
        listing = ", ".join(f.name for f in sorted(p.iterdir())[:8]) or "nothing"
        what = "several checkpoint files" if candidates else "no checkpoint"
        raise UnknownFormatError(f"{p}: a folder with {what} (it holds {listing}); name the file to open")
    if p.name.endswith(".index.json"):
        return "sharded", p
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "torch", p
    # before the pickle check: a safetensors header length may start with the byte 0x80
    if looks_like_safetensors(head, size) or p.suffix == ".safetensors":
        return "safetensors", p
    if head[:1] == b"\x80":
        return "torch", p
    raise UnknownFormatError(
        f"{p}: unknown format (not safetensors, a torch.save file, a sharded index or a DCP folder)")
