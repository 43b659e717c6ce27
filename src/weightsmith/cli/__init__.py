"""The ``weightsmith`` command: one thin subcommand per file, each handing its work to the library.

Exit codes: 0 fine, 1 findings or differences, 2 error. Subcommand modules are imported
only when their command runs, so ``weightsmith inspect`` starts without importing torch.
"""

from __future__ import annotations

import importlib
import sys
import click

__all__ = ["main", "cli"]

# command name -> module under weightsmith.cli holding a click command named `command`
_COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("inspect", "Show the parameter table of a checkpoint or a model."),
    "check": ("check", "Check a checkpoint: pickle globals, tensor health, and with --verify its checksums."),
    "plan": ("plan", "Show where each target key's value would come from."),
    "warmstart": ("warmstart", "Write a checkpoint shaped for a target model, warm-started from a source."),
    "diff": ("diff", "Compare two checkpoints: keys, shapes, and how much each tensor moved."),
    "convert": ("convert", "Convert a checkpoint to safetensors, sharded safetensors or a torch file."),
    "merge": ("merge", "Merge checkpoints: soups, task arithmetic, TIES, DARE, SLERP, layer stacking."),
    "report": ("report", "Write a self-contained HTML health report of a checkpoint."),
    "demo": ("demo", "Run the built-in example end to end."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        entry = _COMMANDS.get(name)
        if entry is None:
            return None
        return importlib.import_module(f"{__name__}.{entry[0]}").command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, _COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> object:
        """The one error path of every subcommand: a weightsmith error is one line and exit 2
        (``--debug``: the traceback), whether the group runs from `main` or is invoked directly."""
        from ..errors import WeightsmithError

        try:
            return super().invoke(ctx)
        except WeightsmithError as e:
            if (ctx.obj or {}).get("debug"):
                raise
            from ._common import abort

            abort(str(e))


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="weightsmith")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """weightsmith: look at, change and move PyTorch model weights safely."""
    ctx.obj = {"debug": debug}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m weightsmith``: returns 0, or exits with
    1 (findings) or 2 (error); weightsmith errors print one line (``--debug``: the traceback)."""
    from ..errors import WeightsmithError

    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        code = cli.main(args=argv, prog_name="weightsmith", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(2)
    except WeightsmithError as e:
        if debug:
            raise
        from ._common import cli_hints

        click.echo(f"error: {cli_hints(str(e))}", err=True)
        sys.exit(2)
