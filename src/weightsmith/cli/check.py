"""``weightsmith check PATH``: the one verification command, a CI gate (exit 0 fine, 1 findings).

It lists every global a pickle in the file names, classified against the allowlist (read from
the opcodes, never run); checks tensor health (NaN, Inf, all-zero, constant, exploding); and with
``--verify`` recomputes the recorded checksums. A file that would run code is a finding, and its
tensors are not read.

NaN, Inf and exploding tensors are errors (exit 1); all-zero and constant tensors are warnings,
normal in healthy models (a zero bias), unless named in ``--checks`` or with ``--strict``.
"""

from __future__ import annotations

import os
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
@click.option("--checks", "checks", metavar="LIST",
              help="Only these checks, comma-separated (nan,inf,all_zero,constant,exploding); each named "
                   "one fails the check.")
@click.option("--ignore", "ignored", multiple=True, metavar="CHECK",
              help="Skip this check (repeatable), e.g. --ignore all_zero.")
@click.option("--strict", is_flag=True, help="Warnings (all-zero, constant tensors) fail the check too.")
@click.option("--verify", is_flag=True, help="Recompute per-tensor (safetensors) or per-member (zip) checksums.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def command(ctx: click.Context, path: str, as_json: bool, patterns: tuple[str, ...],
            max_abs: float | None, checks: str | None, ignored: tuple[str, ...], strict: bool,
            verify: bool, quiet: bool) -> None:
    """Check PATH: pickle globals, tensor health, and with --verify its checksums."""
    # numpy's BLAS starts a thread per core when imported (tens of ms on a busy machine); the
    # kernels run their own worker threads, each calling BLAS single-threaded, so one is enough
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import weightsmith
    from ..errors import WeightsmithError
    from ..health import CHECKS, ERRORS, MAX_ABS, check
    from ..trust import scan_globals, verify as verify_checksums

    reports: dict[str, object] = {}
    chosen, failing = _kinds(checks, ignored, strict, CHECKS, ERRORS)
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
                                              max_abs=MAX_ABS if max_abs is None else max_abs,
                                              checks=chosen, errors=failing, progress=progress)
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


def _kinds(checks: str | None, ignored: tuple[str, ...], strict: bool, every: tuple[str, ...],
           errors: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The checks to run and those that fail: ``--checks`` names both, ``--ignore`` drops, ``--strict`` fails all."""
    named = tuple(k.strip() for k in checks.split(",") if k.strip()) if checks is not None else None
    unknown = sorted((set(named or ()) | set(ignored)) - set(every))
    if unknown:
        abort(f"unknown check {', '.join(unknown)}; choose from {', '.join(every)}")
    chosen = tuple(k for k in (named if named is not None else every) if k not in ignored)
    failing = chosen if strict else tuple(k for k in chosen if k in errors or (named and k in named))
    return chosen, failing
