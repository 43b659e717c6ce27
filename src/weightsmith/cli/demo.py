"""``weightsmith demo``: the scenarios of the docs, run end to end on the small example models."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-output"),
              show_default=True, help="Folder for the demo's files (it owns the folder's demo files).")
def command(out: Path) -> None:
    """Run the built-in example: every scenario on the small models, with its output."""
    from rich.console import Console

    from ..demo import run

    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    run(out, console if console.is_terminal else Console(width=120))
