"""Sharded save and load through weightsmith vs ``dcp.save`` / ``dcp.load`` called directly.

Part 1 (the claim): 2 processes (CPU, gloo) hold a ~1 GB model of DTensor parameters sharded
by rows. weightsmith saves with ``weightsmith.save(model, folder, format="dcp")`` (staged beside
the target, swapped in atomically) and loads with ``weightsmith.load_(model, folder)`` (a plan on
every rank, ``dcp.load`` through the restricted reader into staging buffers, a collective
agreement, then a copy into the shards). The baseline calls ``dcp.save`` with the same
``FileSystemWriter(single_file_per_rank=True, sync_files=True)`` and ``dcp.load`` with
``FileSystemReader`` straight into the model's state dict. Runs alternate (saves in blocks, see
SAVE_BLOCK); medians are shown; the page cache is warm (a first round is dropped).
Claim: overhead <= 5% (ratio <= 1.05).

Two references show what the guarantees cost by themselves, done by hand with plain DCP calls:
a save into a staging folder swapped in (old version deleted, folder fsynced) like weightsmith's,
and a load into freshly allocated buffers laid out like the shards, then copied in.

Part 2: the same model at a smaller size on 1, 2 and 4 ranks: time of a weightsmith save, a
load from that DCP folder and a load from the same values as one safetensors file, and the peak
private memory (/proc RssAnon) each rank adds while doing it; the page cache the files pass
through (and that loads read in before copying) is the kernel's, shared and reclaimable, and is
not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from _common import table

ROW_MULTIPLE = 12  # rows divisible by 1, 2, 3 and 4 ranks
COLS = 4096
LAYERS = 16


# -- inside each rank -----------------------------------------------------------------------------
def _setup(rank: int, world: int, tmp: Path, name: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous-{name}", rank=rank, world_size=world)


def _model(size_gb: float, seed: int) -> Any:
    """A module of ``LAYERS`` DTensor parameters sharded by rows; each rank builds only its shard."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    world, rank = dist.get_world_size(), dist.get_rank()
    rows = max(ROW_MULTIPLE, int(size_gb * 1e9 / 4 / COLS / LAYERS) // ROW_MULTIPLE * ROW_MULTIPLE)
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    model = nn.Module()
    for i in range(LAYERS):
        local = torch.randn(rows // world, COLS, generator=g)
        param = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=(rows, COLS),
                                   stride=(COLS, 1))
        model.register_parameter(f"layer{i}", nn.Parameter(param))
    return model


def _timed(fn: Any) -> float:
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def _pair(rank: int, world: int, tmp: Path, size_gb: float, repeat: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    import weightsmith as ws

    _setup(rank, world, tmp, "pair")
    model = _model(size_gb, seed=0)

    def dcp_save() -> None:
        dcp.save(model.state_dict(), storage_writer=FileSystemWriter(
            tmp / "dcp_ckpt", single_file_per_rank=True, sync_files=True))

    contenders = {
        "save": {"weightsmith.save(format='dcp')": lambda: ws.save(model, tmp / "ws_ckpt", format="dcp"),
                 "dcp.save": dcp_save,
                 REF_SAVE: lambda: _staged_dcp_save(model, tmp / "ref_ckpt")},
        "load": {"weightsmith.load_": lambda: ws.load_(model, tmp / "dcp_ckpt"),
                 "dcp.load": lambda: dcp.load(model.state_dict(),
                                              storage_reader=FileSystemReader(tmp / "dcp_ckpt")),
                 REF_LOAD: lambda: _staged_dcp_load(model, tmp / "dcp_ckpt")},
    }
    samples: dict[str, list[float]] = {name: [] for group in contenders.values() for name in group}
    switched: dict[str, list[float]] = {name: [] for name in contenders["save"]}
    for op in ("save", "load"):
        block = SAVE_BLOCK if op == "save" else 1
        for i in range(repeat + 1):  # the first round warms the page cache and is dropped
            order = list(contenders[op].items())
            for name, fn in order if i % 2 == 0 else reversed(order):
                for j in range(block):
                    took = _timed(fn)
                    if i and (j or block == 1):
                        samples[name].append(took)
                    elif i:
                        switched[name].append(took)
    if rank == 0:
        (tmp / "pair.json").write_text(json.dumps({"samples": samples, "switched": switched}))


# A save needs page-cache memory for what it writes. On this virtual machine, memory the guest
# has not used lately costs a host fault per page on first use, so a save is fast when it reuses
# pages its own previous save freed and up to 2.5x slower when it follows another contender
# that freed its pages elsewhere (both seen). A training job saves the same way every time, so
# saves run in blocks: each contender saves SAVE_BLOCK times in a row, and the first save of
# each block, the one after a switch, is reported apart.
SAVE_BLOCK = 3


REF_SAVE = "ref: dcp.save staged + swapped by hand"
REF_LOAD = "ref: dcp.load into new buffers + copy"


def _staged_dcp_save(model: Any, path: Path) -> None:
    """What a crash-safe DCP save costs with plain calls: stage, swap, delete the old, fsync."""
    import shutil
    import uuid

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    name = [str(path.parent / f".{path.name}.stage-{uuid.uuid4().hex}")]
    dist.broadcast_object_list(name, src=0)
    dcp.save(model.state_dict(), storage_writer=FileSystemWriter(name[0], single_file_per_rank=True,
                                                                 sync_files=True))
    dist.barrier()
    if dist.get_rank() == 0:
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
        if path.exists():
            os.rename(path, old)
        os.rename(name[0], path)
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        shutil.rmtree(old, ignore_errors=True)


def _staged_dcp_load(model: Any, path: Path) -> None:
    """What an all-or-nothing DCP load costs with plain calls: read into new buffers, then copy."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.tensor import empty

    state = model.state_dict()
    staged = {k: empty(v.shape, dtype=v.dtype, device_mesh=v.device_mesh, placements=v.placements)
              for k, v in state.items()}
    dcp.load(staged, storage_reader=FileSystemReader(path))
    with torch.no_grad():
        for k, v in state.items():
            v.to_local().copy_(staged[k].to_local())


class _Peak:
    """Samples this process's private resident memory every few milliseconds; the peak above the start."""

    def __init__(self) -> None:
        self.base = self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.now())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now()) - self.base


def _scale(rank: int, world: int, tmp: Path, size_gb: float, repeat: int) -> None:
    import torch.distributed as dist

    import weightsmith as ws

    _setup(rank, world, tmp, f"scale{world}")
    model = _model(size_gb, seed=1)
    folder = tmp / f"scale_{world}"
    result: dict[str, Any] = {"shard_bytes": sum(p.to_local().nbytes for p in model.parameters())}
    single = tmp / f"scale_{world}.safetensors"
    ops = (("save", lambda: ws.save(model, folder, format="dcp")),
           ("load", lambda: ws.load_(model, folder)),
           ("convert", lambda: ws.convert(folder, single) if rank == 0 else None),
           ("load_file", lambda: ws.load_(model, single)))
    times: dict[str, list[float]] = {op: [] for op, _ in ops}
    peaks: dict[str, list[int]] = {op: [] for op, _ in ops}
    for _ in range(repeat):
        for op, fn in ops:
            dist.barrier()
            peak = _Peak()
            times[op].append(_timed(fn))
            peaks[op].append(peak.stop())
    for op in times:
        result[f"{op}_s"] = statistics.median(times[op])
        result[f"{op}_peak"] = max(peaks[op])
    (tmp / f"scale_{world}_{rank}.json").write_text(json.dumps(result))


def _main(rank: int, fn: Any, world: int, tmp: str, args: tuple[Any, ...]) -> None:
    import torch.distributed as dist

    try:
        fn(rank, world, Path(tmp), *args)
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(fn: Any, world: int, tmp: Path, *args: Any) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_main, args=(fn, world, str(tmp), args), nprocs=world)


# -- the report ------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-gb", type=float, default=1.0, help="model size for the 2-rank comparison")
    ap.add_argument("--scale-gb", type=float, default=0.4, help="model size for the 1/2/4-rank scaling")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--scale-repeat", type=int, default=3, help="runs per rank count in the scaling part")
    ap.add_argument("--quick", action="store_true", help="0.1 GB, 0.05 GB scaling, 1 run")
    args = ap.parse_args()
    if args.quick:
        args.size_gb, args.scale_gb, args.repeat, args.scale_repeat = 0.1, 0.05, 1, 1
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        tmp = Path(d)
        _spawn(_pair, 2, tmp, args.size_gb, args.repeat)
        pair = json.loads((tmp / "pair.json").read_text())
        samples, switched = pair["samples"], pair["switched"]
        worlds = (1, 2, 4)
        scale = {}
        for world in worlds:
            _spawn(_scale, world, tmp, args.scale_gb, args.scale_repeat)
            scale[world] = [json.loads((tmp / f"scale_{world}_{r}.json").read_text()) for r in range(world)]

    med = {k: statistics.median(v) for k, v in samples.items()}
    rows = [("operation", "contender", "median (s)", "ratio vs dcp")]
    for op, ours, base, ref in (("save", "weightsmith.save(format='dcp')", "dcp.save", REF_SAVE),
                                ("load", "weightsmith.load_", "dcp.load", REF_LOAD)):
        for name in (ours, base, ref):
            rows.append((op, name, f"{med[name]:.2f}", f"{med[name] / med[base]:.3f}x"))
    print(f"2 ranks (gloo, CPU), {args.size_gb} GB float32 model sharded by rows; loads: median of "
          f"{args.repeat} alternating runs; saves: median of {args.repeat} alternating blocks of {SAVE_BLOCK}, "
          "the first save of each block left out")
    print(table(rows))
    firsts = ", ".join(f"{name} {statistics.median(v):.2f} s" for name, v in switched.items() if v)
    print(f"first save of each block (after another contender's), median: {firsts}")
    print()

    def mb(n: float) -> str:
        return f"{n / 1e6:,.0f}"

    rows = [("ranks", "shard/rank (MB)", "save (s)", "load (s)", "load .safetensors (s)",
             "save peak/rank (MB)", "load peak/rank (MB)", "load .safetensors peak/rank (MB)")]
    for world in worlds:
        ranks = scale[world]
        rows.append((str(world), mb(ranks[0]["shard_bytes"]), f"{ranks[0]['save_s']:.2f}", f"{ranks[0]['load_s']:.2f}",
                     f"{ranks[0]['load_file_s']:.2f}", mb(max(r["save_peak"] for r in ranks)),
                     mb(max(r["load_peak"] for r in ranks)), mb(max(r["load_file_peak"] for r in ranks))))
    print(f"weightsmith on 1, 2 and 4 ranks, {args.scale_gb} GB model, median of {args.scale_repeat} runs "
          f"({os.cpu_count()} CPU cores); peak = private memory added during the call, max over ranks")
    print(table(rows))


if __name__ == "__main__":
    main()
