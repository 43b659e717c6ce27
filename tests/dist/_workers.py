"""Worker functions for the multi-process tests: each runs on every rank of a CPU gloo group.

Spawned children import this module by name, so it holds everything they run. Workers check
nothing themselves: they write what they saw (full tensors, shapes, errors, before/after
comparisons) into the test's tmp folder, and the tests assert on those files.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import weightsmith as ws

# -- running ------------------------------------------------------------------------------------


def run(fn: Any, world: int, tmp: Path, *args: Any, timeout: float = 90.0) -> None:
    """Run ``fn(rank, world, tmp, *args)`` on ``world`` spawned processes; fail on error or hang."""
    ctx = mp.spawn(_main, args=(fn, world, str(tmp), args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{fn.__name__} on {world} ranks did not finish in {timeout:.0f} s")


def _main(rank: int, fn: Any, world: int, tmp: str, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous-{fn.__name__}", rank=rank,
                            world_size=world)
    try:
        fn(rank, world, Path(tmp), *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1, default=str))


# -- the model ----------------------------------------------------------------------------------


class Net(nn.Module):
    """Weights of 8, 10 and 3 rows: shards even on 2 and 4 ranks, uneven on 3, empty on rank 3 of 4."""

    def __init__(self, count: int = 1) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)      # a.weight (8, 4): Shard(0)
        self.b = nn.Linear(8, 10)     # b.weight (10, 8): Shard(1), b.bias replicated
        self.head = nn.Linear(10, 3)  # head.weight (3, 10): Shard(0), one row per rank of 4
        self.register_buffer("count", torch.arange(count, dtype=torch.int64) + 7)  # plain, not sharded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.a(x).relu()).relu())


def placements() -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard

    return {"a.weight": Shard(0), "a.bias": Shard(0), "b.weight": Shard(1), "b.bias": Replicate(),
            "head.weight": Shard(0), "head.bias": Shard(0)}


def shard(model: nn.Module) -> nn.Module:
    """Every parameter of ``model`` as a DTensor over all ranks, placed as `placements` says."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    where = placements()
    for mod_name, mod in list(model.named_modules()):
        for name, p in list(mod.named_parameters(recurse=False)):
            full = f"{mod_name}.{name}" if mod_name else name
            mod.register_parameter(name, nn.Parameter(distribute_tensor(p.detach(), mesh, [where[full]])))
    return model


def sharded_net(seed: int, count: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return shard(Net(count))


def fsdp_net(seed: int) -> nn.Module:
    """A Net sharded by FSDP2's ``fully_shard`` (rows over all ranks), ``a`` as its own unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = Net()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(model.a, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor whole (collective: every rank calls it)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def local_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.to_local().shape) for k, v in model.state_dict().items() if hasattr(v, "to_local")}


def snapshot(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """Each parameter and buffer's object id and a copy of this rank's local values."""
    return {k: (id(v), (v.to_local() if hasattr(v, "to_local") else v).detach().clone())
            for k, v in model.state_dict(keep_vars=True).items()}


def unchanged(model: nn.Module, before: dict[str, tuple[int, torch.Tensor]]) -> bool:
    now = snapshot(model)
    return now.keys() == before.keys() and all(
        now[k][0] == before[k][0] and torch.equal(now[k][1], before[k][1]) for k in before)


def attempt(fn: Any) -> dict[str, str] | None:
    """Run ``fn``; the error it raised, by type and text, or ``None``."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - recorded for the test to judge
        return {"type": type(e).__name__, "message": str(e)}
    return None


# -- workers ------------------------------------------------------------------------------------


def save_sharded(rank: int, world: int, tmp: Path) -> None:
    """Save a sharded Net with weightsmith, synchronously and asynchronously; record the truth."""
    model = sharded_net(seed=0)
    ws.save(sharded_net(seed=9), tmp / "ckpt", format="dcp")  # replaced next: all ranks delete the old files
    report = ws.save(model, tmp / "ckpt", format="dcp")
    future = ws.save(model, tmp / "ckpt_async", format="dcp", async_save=True)
    async_report = future.result(timeout=60)
    dist.barrier()  # rank 0's future renames the folder: every rank sees it after this
    full = full_state(model)
    if rank == 0:
        torch.save(full, tmp / "reference.pt")
    summary = ws.summary(model)
    # a 2 x 2 mesh, replicated over its first dimension: each piece must be counted once
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.manual_seed(21)
    value = torch.randn(6, 5)
    grid = distribute_tensor(value, init_device_mesh("cpu", (2, 2)), [Replicate(), Shard(0)])
    grid_stats = ws.stats({"grid": grid}).to_dict()["tensors"]
    write_json(tmp / f"save_{rank}.json", {
        "grid_stats": grid_stats, "grid_whole": ws.stats({"grid": value}).to_dict()["tensors"],
        "report": report.to_dict(), "async_report": async_report.to_dict(),
        "local_shapes": local_shapes(model),
        "summary": {r.name: {"shape": list(r.shape), "local": list(r.local_shape or ()), "count": r.count}
                    for r in summary.rows},
        "summary_text": str(summary)})


def load_resharded(rank: int, world: int, tmp: Path) -> None:
    """Load the 4-rank folders into a Net sharded over this world; then from a truncated copy."""
    model = sharded_net(seed=1)
    params = [id(p) for p in model.parameters()]
    report = ws.load_(model, tmp / "ckpt")
    same_params = params == [id(p) for p in model.parameters()]
    full = full_state(model)
    async_model = sharded_net(seed=2)
    ws.load_(async_model, tmp / "ckpt_async")
    full_async = full_state(async_model)
    # FSDP2: load, then one optimizer step must still move the loaded parameters
    fsdp = fsdp_net(seed=3)
    ws.load_(fsdp, tmp / "ckpt")
    full_fsdp = full_state(fsdp)
    fsdp_stats = {"sharded": ws.stats(fsdp).to_dict()["tensors"], "whole": ws.stats(full_fsdp).to_dict()["tensors"]}
    optimizer = torch.optim.SGD(fsdp.parameters(), lr=0.1)
    fsdp(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    stepped = full_state(fsdp)
    if rank == 0:
        torch.save({"sync": full, "async": full_async, "fsdp": full_fsdp, "fsdp_stepped": stepped},
                   tmp / f"loaded_{world}.pt")
    # a data file cut inside b.weight's last chunk: only the rank holding its last columns reads it
    if rank == 0:
        shutil.copytree(tmp / "ckpt", tmp / "ckpt_truncated")
        (chunk,) = [c for c in ws.open(tmp / "ckpt").reader.layout["b.weight"] if c.file == "__3_0.distcp"]
        os.truncate(tmp / "ckpt_truncated" / chunk.file, chunk.byte_offset + chunk.length // 2)
    dist.barrier()
    before = snapshot(model)
    error = attempt(lambda: ws.load_(model, tmp / "ckpt_truncated"))
    write_json(tmp / f"load_{world}_{rank}.json", {
        "report": report.to_dict(), "local_shapes": local_shapes(model), "same_params": same_params,
        "fsdp_stats": fsdp_stats,
        "truncated_error": error, "unchanged_after_truncated": unchanged(model, before)})


class _FailingDict(dict):  # type: ignore[type-arg]
    """A state dict whose reads fail for one key, like a lazily read file hitting a bad disk."""

    def __getitem__(self, key: str) -> Any:
        if key == "b.weight":
            raise OSError(f"injected read failure for {key}")
        return super().__getitem__(key)


def warmstart(rank: int, world: int, tmp: Path) -> None:
    """Warm-start sharded Nets from a single file and a one-process DCP folder; failures on one rank."""
    rename = [("enc.weight", "a.weight"), ("enc.bias", "a.bias"), ("proj.weight", "b.weight", "transpose"),
              ("proj.bias", "b.bias")]
    model = sharded_net(seed=3)
    head_before = full_state(model)
    plan = ws.plan(model, tmp / "source.safetensors", rename=rename)
    report = ws.load_(model, tmp / "source.safetensors", rename=rename, strict=False)
    after = full_state(model)
    # the same model saved by one process with DataParallel's "module." prefix, as DCP
    from_dcp = sharded_net(seed=4)
    ws.load_(from_dcp, tmp / "plain_dcp")
    from_dcp_full = full_state(from_dcp)
    if rank == 0:
        torch.save({"before": head_before, "after": after, "from_dcp": from_dcp_full}, tmp / "warm.pt")
    ws.save(model, tmp / "ckpt3", format="dcp")
    summary = ws.summary(model)
    # statistics of sharded tensors: every rank measures its shards, the ranks combine them
    sharded_stats = ws.stats(model).to_dict()
    whole_stats = ws.stats(full_state(model)).to_dict()
    with torch.no_grad():
        if rank == 2:  # a NaN only rank 2 holds
            model.a.weight.to_local()[0, 0] = float("nan")
    health = ws.check(model).to_dict()

    # one rank's model disagrees with the source: a shape problem only rank 1 sees
    odd = sharded_net(seed=5, count=2 if rank == 1 else 1)
    odd_before = snapshot(odd)
    shape_error = attempt(lambda: ws.load_(odd, tmp / "source.safetensors", rename=rename, strict=False))
    # one rank fails to read a value while staging: every rank's model stays as it was
    good = sharded_net(seed=6)
    source = ws.open(tmp / "plain.safetensors").load()
    source = _FailingDict(source) if rank == 1 else dict(source)
    good_before = snapshot(good)
    read_error = attempt(lambda: ws.load_(good, source))
    # every rank's reads succeed and a, bias and head wait, read in, to go straight onto the shards;
    # then transposing proj.weight fails on rank 1: no rank may write what it read
    import weightsmith.distributed.sharded_load as wd

    deferred_errors, deferred_unchanged = {}, {}
    for name in ("source_dcp", "source.safetensors"):
        deferred = sharded_net(seed=7)
        deferred_before = snapshot(deferred)
        value = wd.value_of
        if rank == 1:
            def failing(step: Any, *args: Any) -> Any:
                raise OSError(f"injected transform failure for {step.target}")
            wd.value_of = failing
        try:
            deferred_errors[name] = attempt(lambda m=deferred, n=name: ws.load_(m, tmp / n, rename=rename, strict=False))
        finally:
            wd.value_of = value
        deferred_unchanged[name] = unchanged(deferred, deferred_before)
    write_json(tmp / f"warm_{rank}.json", {
        "deferred_errors": deferred_errors, "unchanged_after_deferred_error": deferred_unchanged,
        "plan_counts": plan.counts(), "report": report.to_dict(), "local_shapes": local_shapes(model),
        "summary": {r.name: {"shape": list(r.shape), "local": list(r.local_shape or ())} for r in summary.rows},
        "sharded_stats": sharded_stats, "whole_stats": whole_stats, "health": health,
        "shape_error": shape_error, "unchanged_after_shape_error": unchanged(odd, odd_before),
        "read_error": read_error, "unchanged_after_read_error": unchanged(good, good_before)})
