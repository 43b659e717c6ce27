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


def step_look(out: Path, console: Any) -> None:
    """S1-S5: names, per-module holdings, state dict entries, the table, statistics and health."""
    import torch
    from torch import nn

    import weightsmith as ws
    from weightsmith.examples import mlp, tied_mlp

    torch.manual_seed(0)
    model = mlp()
    _section(console, "Look S1/S4: every parameter, with totals (a tied parameter counted once)")
    console.print(ws.summary(tied_mlp()))
    _section(console, "Look S2/S3: what each layer holds, buffers included")
    bn = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
    console.print(ws.summary(bn).modules_table())
    _section(console, "Look S5: statistics, and a named failure for NaN/Inf")
    console.print(ws.stats(model))
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    console.print(ws.check(model))


def step_change(out: Path, console: Any) -> None:
    """S6-S14, S24: initialize, assign, update, tie, snapshot, cast."""
    import torch
    from torch import nn

    import weightsmith as ws
    from weightsmith.examples import mlp, tied_mlp

    model = mlp()
    _section(console, "Change S6/S7: initialize by rules (first match wins), reproducibly")
    console.print(ws.init_(model, [(nn.Linear, {"weight": "xavier_uniform", "bias": "zeros"})], seed=0))

    def custom(t: torch.Tensor) -> None:  # S8: uniform in [-10, 10], then zero |w| < 5
        t.uniform_(-10, 10)
        t[t.abs() < 5] = 0

    ws.init_(model, [("0.weight", custom)], seed=0)
    console.print(f"S8 custom init: {float((model[0].weight == 0).float().mean()):.0%} of 0.weight zeroed")
    _section(console, "Change S9/S10: assign checked tensors in place; the optimizer keeps working")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    console.print(ws.assign_(model, {"2.bias": torch.tensor([0.5]), "0.bias": torch.zeros(8, dtype=torch.float64)}))
    try:
        ws.assign_(model, {"2.bias": torch.zeros(1), "0.weight": torch.zeros(4, 8)})
    except ws.AssignError as e:
        console.print(f"[yellow]refused, nothing written:[/] {e}")
    model(torch.randn(2, 4)).sum().backward()
    before = model[2].bias.detach().clone()
    opt.step()
    console.print(f"optimizer step after assign_ moved 2.bias: {not torch.equal(before, model[2].bias)}")
    _section(console, "Change S11/S12: update in place through a function (no rebinding mistake)")
    console.print(ws.update_(model, lambda t: t * 0.5, select=lambda name, p: p.ndim > 1))
    _section(console, "Change S13: make layer 4 use layer 2's parameters; list the tied groups")
    untied = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 1))
    console.print(ws.tie_(untied, "4", "2"))
    console.print(f"ties: {ws.ties(untied)}; same as the model built tied: {ws.ties(tied_mlp())}")
    _section(console, "Change S14: a true snapshot (state_dict() aliases the live model), then restore")
    snap = ws.snapshot(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ws.restore_(model, snap)
    console.print(f"restored bit for bit: {torch.equal(model[0].weight, snap['0.weight'])}")
    _section(console, "Change S24: half precision for a subset, norms kept in float32")
    normed = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    console.print(ws.cast_(normed, torch.float16))


def step_train_setup(out: Path, console: Any) -> None:
    """S20-S22: freeze all but the head, schedule freezing, param groups."""
    import torch
    from torch import nn

    import weightsmith as ws

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3))
    _section(console, "Change S20: freeze everything except the head (layer 4), BatchNorm statistics held too")
    console.print(ws.freeze_(model, "!4", norm_eval=True))
    opt = torch.optim.AdamW(ws.param_groups(model, lr=1e-3, weight_decay=0.01))
    console.print(f"optimizer gets only what trains: {sum(len(g['params']) for g in opt.param_groups)} tensors")
    _section(console, "Change S21: a schedule: freeze block 3 at epoch 5, unfreeze and re-initialize at 10")
    ws.unfreeze_(model)
    for epoch in (5, 10):
        if epoch == 5:
            console.print(f"epoch 5: {ws.freeze_(model, '3')}")
        else:
            console.print(f"epoch 10: {ws.unfreeze_(model, '3')}")
            ws.init_(model, [("3.weight", "xavier_uniform"), ("3.bias", "zeros")], seed=0)
    _section(console, "Change S22: low lr for pretrained layers, high for the head, no decay on biases/norms")
    groups = ws.param_groups(model, lr=1e-4, weight_decay=0.05, rules=[("4", {"lr": 1e-2})])
    console.print(groups.explain() if hasattr(groups, "explain") else groups)


def step_compare_convert_show(out: Path, console: Any) -> None:
    """What fine-tuning moved (diff), a pickle turned into safetensors (convert), and the HTML report."""
    import torch

    import weightsmith as ws
    from weightsmith.examples import model_a

    torch.manual_seed(0)
    base = model_a()
    ws.save(base, out / "base.safetensors")
    with torch.no_grad():  # "fine-tune": the head moves a lot, fc a little, the rest not at all
        base.head.weight.add_(0.5 * torch.randn_like(base.head.weight))
        base.fc.weight.mul_(1.01)
    torch.save(base.state_dict(), out / "tuned.pt")
    _section(console, "Compare: what fine-tuning moved (streamed tensor pair by pair)")
    console.print(ws.diff(out / "base.safetensors", out / "tuned.pt"))
    _section(console, "Convert: the torch pickle to half-precision safetensors, verified")
    console.print(ws.convert(out / "tuned.pt", out / "tuned-fp16.safetensors", dtype=torch.float16, verify=True))
    _section(console, "Show: a self-contained HTML report, with what moved against the base")
    path = ws.report(out / "tuned.pt", out / "report.html", compare=out / "base.safetensors")
    console.print(f"report written to {path} (open it in a browser; no network needed)")


STEPS: list[Step] = [step_look, step_change, step_train_setup, step_save_and_inspect, step_warmstart,
                     step_compare_convert_show]


def run(out: Path, console: Any) -> None:
    """Run every step, writing files under ``out``."""
    for step in STEPS:
        step(out, console)
    console.rule("[bold green]demo complete")
    console.print(f"files are in {out.resolve()}")
