"""The options `plan` and `warmstart` share, declared once: what a plan is made with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

__all__ = ["plan_options", "plan_arguments"]


def plan_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--into``, ``--rules``, ``--match``, ``--on-mismatch`` and ``--allow-unused-rules``."""
    for option in reversed([
        click.option("--into", "target", required=True, help="Target: a checkpoint, or package.module:factory."),
        click.option("--rules", type=click.Path(exists=True, dir_okay=False), help="Rename rules (.toml or .json)."),
        click.option("--match", "match", type=click.Choice(["exact", "auto"]), default="exact", show_default=True,
                     help="exact: names, prefixes and rules; auto: also pair the rest by module structure."),
        click.option("--exact", is_flag=True, hidden=True),  # the default now; kept for old scripts
        click.option("--on-mismatch", type=click.Choice(["error", "skip", "adapt"]), default="error",
                     show_default=True),
        click.option("--allow-unused-rules", is_flag=True,
                     help="A rename rule that matches nothing is only a warning."),
    ]):
        command = option(command)
    return command


def plan_arguments(*, rules: str | None, match: str, exact: bool, on_mismatch: str,
                   allow_unused_rules: bool) -> dict[str, Any]:
    """The keyword arguments of `weightsmith.plan` (and `build`, `transfer`) for these options."""
    return {"rename": rules or (), "match": "exact" if exact else match, "on_mismatch": on_mismatch,
            "allow_unused_rules": allow_unused_rules}
