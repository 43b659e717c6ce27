"""Workers for the sharded tie and odd-target tests (spawned children import this module by name)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import weightsmith as ws
from _workers import attempt, full_state, snapshot, unchanged, write_json


def _tied_sharded() -> nn.Module:
    """An embedding and a head that are one DTensor Parameter, 8 rows over the ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(0)
    model = nn.Module()
    model.emb = nn.Embedding(8, 4)
    model.head = nn.Linear(4, 8, bias=False)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    shared = nn.Parameter(distribute_tensor(model.emb.weight.detach(), mesh, [Shard(0)]))
    model.emb.weight = shared
    model.head.weight = shared
    return model


def tied_load(rank: int, world: int, tmp: Path) -> None:
    """A source giving the tie two values: refused on every rank, nothing written; tied= picks one."""
    model = _tied_sharded()
    before = snapshot(model)
    error = attempt(lambda: ws.load_(model, tmp / "untied.safetensors"))
    out = {"error": error, "unchanged": unchanged(model, before)}
    ws.load_(model, tmp / "untied.safetensors", tied="head.weight")
    out["still_tied"] = model.head.weight is model.emb.weight
    out["after"] = full_state(model)["emb.weight"].tolist()
    write_json(tmp / f"tied_{rank}.json", out)
