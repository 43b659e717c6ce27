"""``weightsmith inspect PATH``: the parameter table of a checkpoint, from its header."""

from __future__ import annotations

import click

from ._common import emit, note_ignored_root
from ._target import target_options


@click.command("inspect", short_help="Show the parameter table of a checkpoint or a model.")
@click.argument("target")
@click.option("--filter", "pattern", help="Only keys matching this selector (glob, or re:REGEX).")
@click.option("--sort", type=click.Choice(["name", "size"]), help="Sort rows (default: file order).")
@click.option("--fold", is_flag=True, help="Fold layer indices: one row per family (layers.#.mlp.weight ×24).")
@click.option("--layout", is_flag=True,
              help="Say where each tensor is stored: shard file, or DCP chunk files and regions.")
@click.option("--root", help="Root inside a nested checkpoint (e.g. model_ema).")
@click.option("--trust", is_flag=True, help="Allow unpickling code in a torch file you vouch for.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema weightsmith.inspect/1).")
@target_options
def command(target: str, pattern: str | None, sort: str | None, fold: bool, layout: bool, root: str | None,
            trust: bool, as_json: bool) -> None:
    """Show the parameter table of a checkpoint (read from its header, without loading tensors),
    or of a model built by a factory given as package.module:function (on the meta device)."""
    from ._target import is_factory

    if is_factory(target):
        from ..warmstart.load import empty_init
        from ..tables import summary
        from ._target import load_factory

        factory = load_factory(target)  # imported outside empty_init: see load_factory
        with empty_init():
            model = factory()
        emit(summary(model), as_json=as_json)
        return
    from ..checkpoint import open as open_checkpoint
    from ..listing import list_checkpoint

    ckpt = open_checkpoint(target, root=root, trust=trust)
    note_ignored_root(ckpt, root)
    emit(list_checkpoint(ckpt, select=pattern, sort=sort, fold=fold, layout=layout), as_json=as_json)
