"""Helpers shared by the subcommands: output, exit codes, progress bars."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click

__all__ = ["abort", "cli_hints", "emit", "note_ignored_root", "progress_bar", "EXIT_OK", "EXIT_FINDINGS", "EXIT_ERROR"]

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2
PIPE_WIDTH = 4096  # piped output: wide enough that no key name is ever folded


# Library messages suggest Python keywords; on the command line the flag is what helps.
_HINTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"on_mismatch='(\w+)' or '(\w+)'"), r"--on-mismatch \1 or \2"),
    (re.compile(r"on_mismatch='(\w+)'"), r"--on-mismatch \1"),
    (re.compile(r", or pass allow_empty=True"), ""),  # no flag: the spelling is the fix
    (re.compile(r"trust=True \(CLI: --trust\)"), "--trust"),
    (re.compile(r"open it with trust=True"), "pass --trust"),
)


def cli_hints(text: str) -> str:
    """``text`` with the Python keywords it suggests replaced by the command-line flags."""
    for pattern, flag in _HINTS:
        text = pattern.sub(flag, text)
    return text


def abort(text: str) -> NoReturn:
    """Print a one-line error and exit with code 2."""
    click.echo(f"error: {cli_hints(text)}", err=True)
    sys.exit(EXIT_ERROR)


def emit(result: Any, *, as_json: bool) -> None:
    """Print a result object as JSON, as a table fitted to the terminal, or, piped, as plain
    rows that never wrap a name (so ``grep`` finds every key whole)."""
    if as_json:
        click.echo(result.to_json())
        return
    plain = getattr(result, "plain", None)
    if callable(plain) and _piped():  # rich is not even imported: a script's call stays quick
        click.echo(cli_hints(plain()))
        return
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        if callable(plain):
            click.echo(cli_hints(plain()))
            return
        console = Console(width=PIPE_WIDTH)  # tables size to their content: nothing wraps
    with console.capture() as captured:
        console.print(result)
    sys.stdout.write(cli_hints(captured.get()))
    sys.stdout.flush()


def _piped() -> bool:
    """Whether stdout is surely not a terminal: not a tty, and no variable that makes rich treat
    it as one (where one is set, rich decides)."""
    if any(name in os.environ for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")):
        return False
    return not sys.stdout.isatty()


def note_ignored_root(ckpt: Any, root: str | None) -> None:
    """Say on stderr when ``--root`` had no effect (a flat file such as safetensors has no roots)."""
    if root and getattr(ckpt, "root", "") != root:
        click.echo(f"note: --root {root!r} is ignored: a {ckpt.format} file holds one flat set of tensors",
                   err=True)


@contextmanager
def progress_bar(description: str, *, quiet: bool = False) -> Iterator[Callable[[int, int, str], None]]:
    """A ``progress(done, total, what)`` callback drawing a rich bar on a terminal.

    Silent when stderr is not a terminal or with ``quiet``.
    """
    if quiet or not sys.stderr.isatty():
        yield lambda done, total, what="": None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeRemainingColumn(), TextColumn("{task.fields[what]}"),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None, what="")

        def update(done: int, total: int, what: str = "") -> None:
            bar.update(task, completed=done, total=total, what=what)

        yield update
