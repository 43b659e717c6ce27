"""A checkpoint path's reader: the format `detect` names, opened by that format's module."""

from __future__ import annotations

from pathlib import Path

from ._base import Reader
from ._detect import detect

__all__ = ["reader_for"]


def reader_for(path: str | Path, *, root: str | None = None, trust: bool = False) -> Reader:
    """The reader for ``path``, having read its header (never its tensor data)."""
    kind, target = detect(path)
    if kind == "safetensors":
        from .safetensors import SafetensorsReader

        return SafetensorsReader(target)
    if kind == "torch":
        from .torchfile import TorchFileReader

        return TorchFileReader(target, root=root, trust=trust)
    if kind == "sharded":
        from .sharded import ShardedReader

        return ShardedReader(target)
    from .dcp import DcpReader

    return DcpReader(target)
