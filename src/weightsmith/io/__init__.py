"""Checkpoint formats: one module per format, each reading headers without loading tensors.

``detect(path)`` names the format of a path by its content; ``reader_for(path)`` returns the
reader that `weightsmith.open` wraps. Nothing here imports torch until tensors are materialized.
"""

from __future__ import annotations

from ._detect import detect
from ._dispatch import reader_for

__all__ = ["detect", "reader_for"]
