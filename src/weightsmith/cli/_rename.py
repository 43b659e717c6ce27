"""The CLI's renaming options: ``--strip-prefix``, ``--rename SRC=DST``, ``--rules FILE`` (see `renaming`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


__all__ = ["rename_options"]


def rename_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--strip-prefix``, ``--rename`` and ``--rules``, as ``plan`` takes them."""
    fn = click.option("--rules", type=click.Path(exists=True, dir_okay=False),
                      help="Rename rules (.toml or .json), as for plan.")(fn)
    fn = click.option("--rename", "renames", multiple=True, metavar="SRC=DST",
                      help="Rename keys: a glob with {captures}, e.g. 'encoder.layer.{i}=blocks.{i}' "
                           "(repeatable).")(fn)
    return click.option("--strip-prefix", "prefixes", multiple=True, metavar="PREFIX",
                        help="Drop this prefix from the keys that have it, e.g. 'module.' (repeatable).")(fn)
