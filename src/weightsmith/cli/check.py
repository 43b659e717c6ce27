"""``weightsmith check PATH``: a CI gate on a checkpoint's health (exit 0 healthy, 1 findings)."""

from __future__ import annotations

import click

from ._common import EXIT_FINDINGS, EXIT_OK, abort, emit, progress_bar

__all__ = ["command"]


@click.command(name="check")
@click.argument("path", type=click.Path(dir_okay=True, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--select", "patterns", multiple=True, metavar="PATTERN",
              help="Check only these names (glob or re:regex; repeat to add, !PATTERN to drop).")
@click.option("--max-abs", type=float, default=None, metavar="X",
              help="Flag tensors whose largest magnitude exceeds X (default 1e4).")
@click.pass_context
def command(ctx: click.Context, path: str, as_json: bool, patterns: tuple[str, ...],
            max_abs: float | None) -> None:
    """Check the tensors in PATH for NaN, Inf, all-zero, constant and exploding values."""
    import weightsmith
    from ..errors import WeightsmithError
    from ..health import MAX_ABS, check

    try:
        ckpt = weightsmith.open(path)
        try:
            with progress_bar("checking", quiet=as_json) as progress:
                report = check(ckpt, select=list(patterns) or None,
                               max_abs=MAX_ABS if max_abs is None else max_abs, progress=progress)
        finally:
            getattr(ckpt, "close", lambda: None)()
    except (WeightsmithError, ValueError) as e:
        if (ctx.obj or {}).get("debug"):
            raise
        abort(str(e))
    emit(report, as_json=as_json)
    ctx.exit(EXIT_OK if report.ok else EXIT_FINDINGS)
