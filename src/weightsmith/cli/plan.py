"""``weightsmith plan SOURCE --into TARGET``: where each target key's value would come from."""

from __future__ import annotations

import click

from ._common import EXIT_FINDINGS, emit
from ._target import target_options


@click.command("plan")
@click.argument("source")
@click.option("--into", "target", required=True, help="Target: a checkpoint, or package.module:factory.")
@click.option("--rules", type=click.Path(exists=True, dir_okay=False), help="Rename rules (.toml or .json).")
@click.option("--exact", is_flag=True, help="No structural matching: names only.")
@click.option("--on-mismatch", type=click.Choice(["error", "skip", "adapt"]), default="error", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema weightsmith.plan/1).")
@target_options
def command(source: str, target: str, rules: str | None, exact: bool, on_mismatch: str, as_json: bool) -> None:
    """Print the load plan of SOURCE into TARGET; exit 1 when it has problems."""
    from ..checkpoint import open as open_checkpoint
    from ..load import empty_init
    from ..plan import plan
    from ._target import is_factory, load_factory

    if is_factory(target):
        factory = load_factory(target, source=source)  # imported outside empty_init: see load_factory
        with empty_init():
            model = factory()
    else:
        model = open_checkpoint(target)
    p = plan(model, source, rename=rules or (), match="exact" if exact else "auto", on_mismatch=on_mismatch)
    emit(p, as_json=as_json)
    if p.problems:
        raise SystemExit(EXIT_FINDINGS)
