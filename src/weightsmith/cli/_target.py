"""Resolving a TARGET argument: a checkpoint path, or a ``package.module:factory`` import path."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import WeightsmithError

__all__ = ["is_factory", "load_factory"]


def is_factory(target: str) -> bool:
    """Whether ``target`` names a factory (``pkg.mod:fn``) rather than an existing path."""
    return ":" in target and not Path(target).exists() and not target.startswith(("/", "."))


def load_factory(target: str) -> Callable[[], Any]:
    """Import ``package.module:function`` (the current folder importable), returning the callable."""
    module_name, _, attr = target.partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise WeightsmithError(f"cannot import {module_name!r} for target {target!r}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise WeightsmithError(f"{module_name!r} has no {attr!r} (target {target!r})")
    if not callable(obj):
        raise WeightsmithError(f"{target!r} is not callable: give a function or class building the model")
    return obj
