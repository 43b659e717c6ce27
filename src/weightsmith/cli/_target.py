"""Resolving a TARGET argument: a checkpoint path, or a ``package.module:factory`` import path.

A factory may take keywords (``--kw name=value``, values read as Python literals, never run as
code). A Hugging Face model class (``transformers:BertForMaskedLM``) is built from a config:
``--config PATH``, or by default the ``config.json`` beside the source checkpoint (or in its
folder); ``--kw`` then overrides config fields. Whatever the factory raises becomes one
`UsageError` line (exit 2), the traceback kept for ``--debug``.
"""

from __future__ import annotations

import ast
import functools
import importlib
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

from ..errors import UsageError, WeightsmithError

__all__ = ["is_factory", "load_factory", "parse_kw", "target_options"]

_META_KEY = "weightsmith.target"


def is_factory(target: str) -> bool:
    """Whether ``target`` names a factory (``pkg.mod:fn``) rather than an existing path or a Hub source."""
    return (":" in target and not Path(target).exists() and not target.startswith(("/", ".", "hf:/")))


def target_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config`` and ``--kw`` to a command taking ``--into``; `load_factory` reads them."""

    @functools.wraps(fn)
    def wrapper(*args: Any, config: str | None, kw: tuple[str, ...], **kwargs: Any) -> Any:
        click.get_current_context().meta[_META_KEY] = {"config": config, "kw": kw}
        return fn(*args, **kwargs)

    wrapper = click.option("--kw", "kw", multiple=True, metavar="NAME=VALUE",
                           help="Keyword for the factory (repeatable; values are Python literals: 3, 0.1, "
                                "True, 'text'). For a transformers class, overrides a config field.")(wrapper)
    return click.option("--config", "config", metavar="PATH", type=click.Path(exists=True),
                        help="config.json (or its folder) for a transformers class given to --into "
                             "(default: the config.json beside SOURCE).")(wrapper)


def parse_kw(items: Iterable[str]) -> dict[str, Any]:
    """``["n=3", "act=gelu"]`` -> ``{"n": 3, "act": "gelu"}``: literals parsed, anything else a string.

    >>> parse_kw(["n=3", "p=0.1", "flag=True", "name=gelu", "dims=[1, 2]"])
    {'n': 3, 'p': 0.1, 'flag': True, 'name': 'gelu', 'dims': [1, 2]}
    """
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise UsageError(f"--kw {item!r}: write NAME=VALUE, NAME a Python identifier (e.g. --kw hidden=256)")
        try:
            out[name] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            out[name] = text  # not a literal: the text itself, never evaluated
    return out


def load_factory(target: str, *, source: str | Path | None = None, config: str | Path | None = None,
                 kw: Iterable[str] | dict[str, Any] | None = None) -> Callable[[], Any]:
    """Import ``package.module:function`` (the current folder importable) and return a no-argument
    builder: the factory called with its keywords, or a transformers class built from its config.

    ``config`` and ``kw`` default to the command's ``--config`` / ``--kw`` (see `target_options`);
    ``source`` is the checkpoint whose neighbouring ``config.json`` is the default config.
    Call it outside `empty_init`: a library that keeps references to ``torch.nn.init``
    functions when first imported (transformers does) would otherwise keep the no-op ones.
    """
    meta = _context_meta()
    config = config if config is not None else meta.get("config")
    kwargs = kw if isinstance(kw, dict) else parse_kw(kw if kw is not None else meta.get("kw", ()))
    obj = _import(target)
    if _wants_config(obj):
        path = _config_path(target, config, source)
        return functools.partial(_call, target, _from_config, obj, path, kwargs)
    if config is not None:
        raise UsageError(f"--config is for transformers model classes; {target!r} is a plain factory "
                         f"(pass its arguments with --kw NAME=VALUE)")
    return functools.partial(_call, target, obj, **kwargs)


def _context_meta() -> dict[str, Any]:
    ctx = click.get_current_context(silent=True)
    return dict(ctx.meta.get(_META_KEY, {})) if ctx is not None else {}


def _import(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a module that fails on import is the user's code failing: one line
        raise UsageError(f"cannot import {module_name!r} for target {target!r}: "
                         f"{type(e).__name__}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise UsageError(f"{module_name!r} has no {attr!r} (target {target!r})")
    if not callable(obj):
        raise UsageError(f"{target!r} is not callable: give a function or class building the model")
    return obj


def _wants_config(obj: Any) -> bool:
    """A transformers model class (or Auto class): built from a config, not called bare."""
    return isinstance(obj, type) and (obj.__module__.split(".")[0] == "transformers"
                                      or hasattr(obj, "config_class"))


def _config_path(target: str, config: str | Path | None, source: str | Path | None) -> Path:
    if config is not None:
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise UsageError(f"--config {config}: no config.json there")
        return path
    if source is not None:
        src = Path(source)
        path = (src if src.is_dir() else src.parent) / "config.json"
        if path.is_file():
            return path
        where = f"beside {source}"
    else:
        where = "to use"
    raise UsageError(f"{target} is built from a config, and there is no config.json {where}: "
                     f"pass --config PATH (a config.json or the model folder)")


def _from_config(cls: type, path: Path, overrides: dict[str, Any]) -> Any:
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(path), **overrides)
    if hasattr(cls, "from_config") and not hasattr(cls, "config_class"):  # AutoModel and friends
        return cls.from_config(config)
    return cls(config)


def _call(target: str, factory: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return factory(*args, **kwargs)
    except WeightsmithError:
        raise
    except Exception as e:  # the user's code failed: say so in one line, traceback under --debug
        hint = ""
        if isinstance(e, TypeError) and "required positional argument" in str(e):
            hint = "; pass its arguments with --kw NAME=VALUE"
        raise UsageError(f"building the target {target!r} failed: {type(e).__name__}: {e}{hint}") from e
