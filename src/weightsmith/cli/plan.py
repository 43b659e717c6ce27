"""``weightsmith plan SOURCE --into TARGET``: where each target key's value would come from.

Exit 0 when a load with the same options would run; 1 when it would be refused (problems,
ambiguous, missing or unexplained keys, too little coverage); 2 on errors.
"""

from __future__ import annotations

import click

from ._common import EXIT_FINDINGS, emit
from ._options import plan_arguments, plan_options
from ._target import target_options


@click.command("plan")
@click.argument("source")
@plan_options
@click.option("--strict/--no-strict", default=True, show_default=True,
              help="Judge the plan as a strict load (every key accounted for) or not.")
@click.option("--min-coverage", type=click.FloatRange(0, 1), default=0.5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema weightsmith.plan/1).")
@target_options
def command(source: str, target: str, rules: str | None, match: str, exact: bool, on_mismatch: str,
            allow_unused_rules: bool, strict: bool, min_coverage: float, as_json: bool) -> None:
    """Print the load plan of SOURCE into TARGET; exit 1 when the load would be refused."""
    from ..checkpoint import open as open_checkpoint
    from ..warmstart.load import empty_init
    from ..warmstart.plan import plan
    from ._target import is_factory, load_factory

    if is_factory(target):
        factory = load_factory(target, source=source)  # imported outside empty_init: see load_factory
        with empty_init():
            model = factory()
    else:
        model = open_checkpoint(target)
    p = plan(model, source, **plan_arguments(rules=rules, match=match, exact=exact, on_mismatch=on_mismatch,
                                             allow_unused_rules=allow_unused_rules))
    p.judge(strict=strict, min_coverage=min_coverage)
    emit(p, as_json=as_json)
    if p.refusals(strict=strict, min_coverage=min_coverage):
        raise SystemExit(EXIT_FINDINGS)
