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


STEPS: list[Step] = [step_save_and_inspect]


def run(out: Path, console: Any) -> None:
    """Run every step, writing files under ``out``."""
    for step in STEPS:
        step(out, console)
    console.rule("[bold green]demo complete")
    console.print(f"files are in {out.resolve()}")
