"""``weightsmith check PATH``: the one verification command, a CI gate (exit 0 fine, 1 findings).

It lists every global a pickle in the file names, classified against the allowlist (read from
the opcodes, never run); checks tensor health (NaN, Inf, all-zero, constant, exploding); and with
``--verify`` recomputes the recorded checksums. A file that would run code is a finding, and its
tensors are not read.
"""

from __future__ import annotations

import json

import click

from ._common import EXIT_FINDINGS, EXIT_OK, abort, emit, progress_bar

__all__ = ["command"]


@click.command(name="check")
@click.argument("path", type=click.Path(dir_okay=True, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON (schema weightsmith.check/1).")
@click.option("--select", "patterns", multiple=True, metavar="PATTERN",
              help="Check only these names (glob or re:regex; repeat to add, !PATTERN to drop).")
@click.option("--max-abs", type=float, default=None, metavar="X",
              help="Flag tensors whose largest magnitude exceeds X (default 1e4).")
@click.option("--verify", is_flag=True, help="Recompute per-tensor (safetensors) or per-member (zip) checksums.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def command(ctx: click.Context, path: str, as_json: bool, patterns: tuple[str, ...],
            max_abs: float | None, verify: bool, quiet: bool) -> None:
    """Check PATH: pickle globals, tensor health, and with --verify its checksums."""
    import weightsmith
    from ..errors import WeightsmithError
    from ..health import MAX_ABS, check
    from ..trust import scan_globals, verify as verify_checksums

    reports: dict[str, object] = {}
    try:
        globals_report = scan_globals(path)
        if globals_report.pickles:  # files without pickles (safetensors) have nothing to list
            reports["globals"] = globals_report
        if verify:
            with progress_bar("verifying", quiet=as_json or quiet) as progress:
                reports["verify"] = verify_checksums(path, progress=progress)
        if globals_report.safe:
            ckpt = weightsmith.open(path)
            try:
                with progress_bar("checking", quiet=as_json or quiet) as progress:
                    reports["health"] = check(ckpt, select=list(patterns) or None,
                                              max_abs=MAX_ABS if max_abs is None else max_abs, progress=progress)
            finally:
                ckpt.close()
    except (WeightsmithError, ValueError) as e:
        if (ctx.obj or {}).get("debug"):
            raise
        abort(str(e))
    ok = all(getattr(r, "ok", getattr(r, "safe", True)) for r in reports.values())
    if as_json:
        click.echo(json.dumps({"schema": "weightsmith.check/1", "path": path, "ok": ok,
                               **{k: r.to_dict() for k, r in reports.items()}}, indent=2))
    else:
        for report in reports.values():
            emit(report, as_json=False)
    ctx.exit(EXIT_OK if ok else EXIT_FINDINGS)
