"""``weightsmith merge A B [C...] -o OUT``: merge checkpoints (plan first; exit 1 on plan problems)."""

from __future__ import annotations

import click

from pathlib import Path
from typing import Any

from ._common import EXIT_FINDINGS, abort, emit, progress_bar


def _weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        abort(f"--weights {text!r}: give numbers separated by commas, e.g. 0.5,0.5")


@click.command("merge")
@click.argument("sources", nargs=-1)
@click.option("-o", "--out", help="Output: a .safetensors file, a torch file (.pt/.bin), or a folder with --max-shard-size.")
@click.option("--method", default=None, help="linear, task_arithmetic, ties, dare_linear, dare_ties, slerp, model_stock, passthrough.")
@click.option("--base", help="The base model (task vector methods, model_stock; slerp's t=0 end).")
@click.option("--weights", help="One weight per input, comma-separated: 0.5,0.5.")
@click.option("--density", type=float, help="ties/dare: fraction of each task vector kept.")
@click.option("--t", "t", type=float, help="slerp: interpolation factor.")
@click.option("--lambda", "lambda_", type=float, help="Scale of the merged task vector.")
@click.option("--seed", type=int, help="dare: seed of the random drop.")
@click.option("--dtype", help="Output dtype of floating tensors: float16, bfloat16, float32.")
@click.option("--max-shard-size", help="Write a sharded folder with shards of at most this size (5GB).")
@click.option("--config", "config", type=click.Path(exists=True, dir_okay=False),
              help="A merge.toml, or a mergekit YAML with local model paths.")
@click.option("--dry-run", is_flag=True, help="Print the plan and stop.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the plan, or the report).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--trust", is_flag=True, help="Allow torch files whose pickle calls code (files you vouch for).")
def command(sources: tuple[str, ...], **opts: Any) -> None:
    """Merge SOURCES (or the models of --config) into OUT; --dry-run prints the plan."""
    from ..errors import WeightsmithError

    try:
        _merge(list(sources), opts)
    except WeightsmithError as e:
        abort(str(e))


def _merge(sources: list[str], opts: dict[str, Any]) -> None:
    from ..merging.config import MergeConfig, read_config
    from ..merging.plan import merge_plan
    from ..merging.run import merge

    cfg = read_config(opts["config"]) if opts["config"] else MergeConfig(sources=[], method="linear")
    sources = sources or cfg.sources
    if not sources:
        abort("give the models to merge, or --config")
    params = dict(cfg.params)
    params.update({k: opts[k] for k in ("density", "t", "lambda_", "seed") if opts[k] is not None})
    args = {"method": opts["method"] or cfg.method, "base": opts["base"] or cfg.base,
            "dtype": opts["dtype"] or cfg.dtype, "trust": opts["trust"],
            "weights": _weights(opts["weights"]) if opts["weights"] else cfg.weights}
    plan = merge_plan(sources, **args, **params)
    for note in cfg.notes:
        click.echo(f"note: {note}", err=True)
    if opts["dry_run"] or plan.problems:
        emit(plan, as_json=opts["as_json"])
        if plan.problems:
            raise SystemExit(EXIT_FINDINGS)
        return
    target = opts["out"] or cfg.out
    if not target:
        abort("give the output with -o OUT (or --dry-run)")
    if Path(target).exists() and not opts["force"]:
        abort(f"{target} exists; pass --force to replace it")
    with progress_bar("merging", quiet=opts["as_json"]) as progress:
        report = merge(sources, target, max_shard_size=opts["max_shard_size"], progress=progress, **args, **params)
    emit(report, as_json=opts["as_json"])
