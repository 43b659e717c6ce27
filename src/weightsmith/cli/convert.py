"""``weightsmith convert SRC DST``: rewrite a checkpoint as safetensors, sharded safetensors or a torch file."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import abort, emit, note_ignored_root, progress_bar
from ._rename import rename_options

__all__ = ["command"]


@click.command("convert")
@click.argument("src")
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              help="Cast floating-point tensors to this dtype.")
@click.option("--max-shard-size", metavar="SIZE", help="Write a sharded folder with shards of at most SIZE (5GB).")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "sharded", "torch"]),
              help="Output format (default: from DST's suffix).")
@click.option("--filter", "patterns", multiple=True, metavar="SELECTOR",
              help="Only keys matching (glob or re:regex; repeat to add, !PATTERN to drop).")
@click.option("--verify", is_flag=True, help="Read the output back and compare it with SRC before it replaces DST.")
@click.option("--force", is_flag=True, help="Overwrite DST if it exists.")
@click.option("--root", help="Root inside a nested checkpoint (e.g. model_ema).")
@click.option("--trust", is_flag=True, help="Allow unpickling code in a torch file you vouch for.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (schema weightsmith.convert/1).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@rename_options
@click.pass_context
def command(ctx: click.Context, src: str, dst: Path, dtype: str | None, max_shard_size: str | None,
            fmt: str | None, patterns: tuple[str, ...], verify: bool, force: bool, root: str | None,
            trust: bool, as_json: bool, quiet: bool, prefixes: tuple[str, ...], renames: tuple[str, ...],
            rules: str | None) -> None:
    """Convert checkpoint SRC to DST (.safetensors, a folder with --max-shard-size, or .pt)."""
    from ..conversion import convert

    if dst.exists() and not force:
        abort(f"{dst} exists; pass --force to overwrite it")
    opened = None
    try:
        source: object = src
        if root:  # opened here to say when --root has no effect
            from ..checkpoint import open as open_checkpoint

            source = opened = open_checkpoint(src, root=root, trust=trust)
            note_ignored_root(opened, root)
        with progress_bar("converting", quiet=quiet or as_json) as progress:
            report = convert(source, dst, dtype=dtype, max_shard_size=max_shard_size,
                             select=list(patterns) or None, format=fmt, verify=verify, progress=progress,
                             root=root, trust=trust, strip_prefix=prefixes, rename=renames, rules=rules)
    finally:  # a weightsmith error reaches main(), which prints it as one line and exits 2
        if opened is not None:
            opened.close()
    emit(report, as_json=as_json)
