"""The walkthrough behind ``weightsmith demo``: each scenario as the one call it takes.

It prints (it is the demo), so it lives beside the CLI rather than in library code paths.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["run", "STEPS"]

Step = Callable[[Path, Any], None]


def _section(console: Any, title: str) -> None:
    console.rule(f"[bold]{title}")


def step_save_and_inspect(out: Path, console: Any) -> None:
    """Save the example models in every format, then read them back from their headers."""
    import torch

    import weightsmith as ws
    from weightsmith.examples import mlp, tied_mlp
    from weightsmith.listing import list_checkpoint

    torch.manual_seed(0)
    model, tied = mlp(), tied_mlp()
    _section(console, "Move: save in every format, atomically")
    for path, kwargs in [(out / "mlp.safetensors", {}), (out / "mlp.pt", {}),
                         (out / "tied.safetensors", {}), (out / "tied-sharded", {"max_shard_size": 300})]:
        console.print(ws.save(tied if "tied" in path.name else model, path, **kwargs))
    _section(console, "Look: a checkpoint's table from its header (no tensor loaded)")
    console.print(list_checkpoint(ws.open(out / "tied.safetensors")))
    ckpt = ws.open(out / "tied-sharded")
    loaded = ckpt.load()
    console.print(f"sharded folder: {len(ckpt)} keys in {len(ckpt.reader.shards)} shards; ties {ckpt.ties}; "
                  f"tie restored on load: {loaded['2.weight'] is loaded['4.weight']}")
    _section(console, "Look: a nested training checkpoint (Lightning-style), read without unpickling")
    import argparse

    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": argparse.Namespace(lr=0.1), "optimizer_states": []}, out / "trainer.ckpt")
    ckpt = ws.open(out / "trainer.ckpt")
    console.print(list_checkpoint(ckpt))


def step_warmstart(out: Path, console: Any) -> None:
    """S23: warm-start model B (renamed layer, new head) from model A's checkpoint, plan first."""
    import torch

    import weightsmith as ws
    from weightsmith.examples import model_a, model_b

    torch.manual_seed(0)
    a = model_a()
    ws.save({f"module.{k}": v for k, v in a.state_dict().items()}, out / "model-a-ddp.safetensors")
    _section(console, "Move: warm-start B from A's DataParallel checkpoint — the plan, before anything is written")
    b = model_b()
    rules = [("conv1", "backbone_conv"), ("head", "classifier")]
    plan = ws.plan(b, out / "model-a-ddp.safetensors", rename=rules, on_mismatch=[("classifier", "adapt")])
    console.print(plan)
    _section(console, "Move: apply it, all or nothing")
    report = ws.load_(b, out / "model-a-ddp.safetensors", plan=plan)
    console.print(report)
    same = torch.equal(b.fc.weight, a.fc.weight) and torch.equal(b.classifier.weight[:3], a.head.weight)
    console.print(f"B.fc equals A.fc and B.classifier keeps A.head's 3 rows: {same}")
    before = {k: v.clone() for k, v in b.state_dict().items()}
    try:
        ws.load_(b, out / "model-a-ddp.safetensors")  # no rules: strict load must refuse
    except ws.WeightsmithError as e:
        console.print(f"[yellow]refused as expected:[/] {str(e).splitlines()[0]}")
    untouched = all(torch.equal(before[k], v) for k, v in b.state_dict().items())
    console.print(f"model untouched after the refused load: {untouched}")
    _section(console, "Move: build B directly from the file (parameters mapped, nothing initialized twice)")
    built, report = ws.build(model_b, out / "model-a-ddp.safetensors", rename=rules,
                             on_mismatch=[("classifier", "adapt")])
    console.print(report)


STEPS: list[Step] = [step_save_and_inspect, step_warmstart]


def run(out: Path, console: Any) -> None:
    """Run every step, writing files under ``out``."""
    for step in STEPS:
        step(out, console)
    console.rule("[bold green]demo complete")
    console.print(f"files are in {out.resolve()}")
