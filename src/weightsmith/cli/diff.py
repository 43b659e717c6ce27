"""``weightsmith diff A B``: keys, shapes and how far each tensor moved; exit 0 equal, 1 different."""

from __future__ import annotations

import os

import click

from ._common import EXIT_FINDINGS, EXIT_OK, emit, progress_bar

__all__ = ["command"]


@click.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True,
              help="List this many of the most changed tensors.")
@click.option("--atol", type=click.FloatRange(min=0), default=0.0, help="Absolute tolerance (default 0: exact).")
@click.option("--rtol", type=click.FloatRange(min=0), default=0.0, help="Relative tolerance, times |A|.")
@click.option("--rules", type=click.Path(exists=True, dir_okay=False), help="Rename rules A -> B (.toml or .json).")
@click.option("--select", "selected", multiple=True, metavar="PATTERN",
              help="Compare only these keys (glob, re:regex or a bare name segment; repeatable).")
@click.option("--exclude", "excluded", multiple=True, metavar="PATTERN",
              help="Leave these keys out, on both sides (repeatable), e.g. --exclude position_ids.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema weightsmith.diff/1).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar; print only the summary line.")
@click.pass_context
def command(ctx: click.Context, a: str, b: str, top: int, atol: float, rtol: float, rules: str | None,
            selected: tuple[str, ...], excluded: tuple[str, ...], as_json: bool, quiet: bool) -> None:
    """Compare checkpoints A and B; exit 0 when equal within tolerance, 1 when different, 2 on error."""
    # numpy's BLAS starts a thread per core when imported (tens of ms on a busy machine); the
    # kernels run their own worker threads, each calling BLAS single-threaded, so one is enough
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from ..comparison import diff

    with progress_bar("comparing", quiet=quiet or as_json) as progress:  # errors: the group's one path
        select = [*selected, *(f"!{e}" for e in excluded)] or None
        result = diff(a, b, rename=rules or (), atol=atol, rtol=rtol, select=select, progress=progress)
    result.top = top
    if quiet and not as_json:
        click.echo(result.summary)
    else:
        emit(result, as_json=as_json)
    ctx.exit(EXIT_OK if result.equal else EXIT_FINDINGS)
