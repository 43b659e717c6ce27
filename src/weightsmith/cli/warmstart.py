"""``weightsmith warmstart SOURCE --into TARGET -o OUT``: a checkpoint shaped for TARGET, with its report."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import abort, emit
from ._options import plan_arguments, plan_options
from ._target import target_options


@click.command("warmstart")
@click.argument("source")
@plan_options
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Checkpoint to write.")
@click.option("--strict", is_flag=True, help="Every target key from the source, every source key used.")
@click.option("--tied", default="error", show_default=True,
              help="Tied target keys given different values: error, first, or the key whose value wins.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (schema weightsmith.load/1).")
@target_options
def command(source: str, target: str, rules: str | None, match: str, exact: bool, on_mismatch: str,
            allow_unused_rules: bool, out: Path, strict: bool, tied: str, force: bool, as_json: bool) -> None:
    """Warm-start TARGET from SOURCE and write the result to OUT (plus OUT.report.json)."""
    from ..warmstart.load import build, transfer
    from ..saving import save
    from ._target import is_factory, load_factory

    if out.exists() and not force:
        abort(f"{out} exists; pass --force to overwrite it")
    options = {**plan_arguments(rules=rules, match=match, exact=exact, on_mismatch=on_mismatch,
                                allow_unused_rules=allow_unused_rules), "strict": strict, "tied": tied}
    if is_factory(target):
        model, report = build(load_factory(target, source=source), source, **options)
        state = model.state_dict()
    else:
        state, report = transfer(source, target, **options)
    save(state, out, metadata={"weightsmith.warmstart": f"{source} -> {target}"}
         if out.suffix not in {".pt", ".pth", ".bin", ".ckpt"} else None)
    Path(f"{out}.report.json").write_text(report.to_json())
    emit(report, as_json=as_json)
    click.echo(f"wrote {out} and {out}.report.json", err=as_json)  # with --json, stdout stays JSON
