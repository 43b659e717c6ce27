"""``weightsmith report PATH -o report.html``: a self-contained HTML report on a checkpoint."""

from __future__ import annotations

import os

from pathlib import Path

import click

from ._common import abort, progress_bar

__all__ = ["command"]


@click.command(name="report")
@click.argument("path", type=click.Path(dir_okay=True, path_type=str))
@click.option("-o", "--output", required=True, metavar="FILE",
              type=click.Path(dir_okay=False, path_type=str), help="The HTML file to write.")
@click.option("--compare", metavar="OTHER", type=click.Path(dir_okay=True, path_type=str),
              help="Also plot how far each layer moved from OTHER (e.g. the base model).")
@click.option("--select", "patterns", multiple=True, metavar="PATTERN",
              help="Only these names (glob or re:regex; repeat to add, !PATTERN to drop).")
@click.option("--max-histograms", type=int, default=None, metavar="N",
              help="Histograms for the N largest tensors (default 48), plus tensors with findings.")
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def command(path: str, output: str, compare: str | None,
            patterns: tuple[str, ...], max_histograms: int | None, force: bool,
            quiet: bool) -> None:
    """Write an HTML page on the checkpoint at PATH: health verdict and findings, parameter
    table, per-tensor histograms, a layer x statistic heatmap and, with --compare, the
    relative change of every layer. The page needs no network to open. Prints the file written."""
    # numpy's BLAS starts a thread per core when imported; the kernels need one (see cli/check.py)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from ..html_report import MAX_HISTOGRAMS, report

    if Path(output).exists() and not force:
        abort(f"{output} exists; pass --force to overwrite it")
    with progress_bar("reporting", quiet=quiet) as progress:  # errors: the group's one path
        written = report(path, output, compare=compare, select=list(patterns) or None,
                         max_histograms=MAX_HISTOGRAMS if max_histograms is None
                         else max_histograms, progress=progress)
    click.echo(str(written))
