"""Shared helpers for the benchmark scripts: timing, medians, state dicts of a given size."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any


def state_dict(total_gb: float, *, tensors: int = 50, seed: int = 0) -> dict[str, Any]:
    """A float32 state dict of about ``total_gb`` GB in ``tensors`` equal 2-D tensors."""
    import torch

    g = torch.Generator().manual_seed(seed)
    per = max(1, int(total_gb * 1e9 / 4 / tensors))
    cols = 1024
    rows = max(1, per // cols)
    return {f"layers.{i}.weight": torch.randn(rows, cols, generator=g) for i in range(tensors)}


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_process(args: list[str]) -> float:
    """Wall time of a whole process, start-up and imports included."""
    start = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def medians(named: dict[str, Callable[[], float]], repeat: int) -> dict[str, float]:
    """Median time of each contender, runs interleaved so drift hits all alike."""
    samples: dict[str, list[float]] = {k: [] for k in named}
    for _ in range(repeat):
        for name, fn in named.items():
            samples[name].append(fn())
    return {k: statistics.median(v) for k, v in samples.items()}


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


PY = sys.executable


def precompile() -> None:
    """Write weightsmith's bytecode caches, as ``pip install`` does.

    Timing whole processes otherwise counts compiling weightsmith's source on every start
    where ``PYTHONDONTWRITEBYTECODE`` is set (about 30 ms here), while torch's caches were
    written when it was installed. Processes still read caches with that variable set.
    """
    import compileall
    import importlib.util

    spec = importlib.util.find_spec("weightsmith")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            compileall.compile_dir(folder, quiet=1)


def size_arguments(doc: str | None, *, size_gb: float = 2.0, repeat: int = 3) -> Any:
    """Parse ``--size-gb``, ``--repeat`` and ``--quick`` (0.2 GB, one run)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--size-gb", type=float, default=size_gb)
    ap.add_argument("--repeat", type=int, default=repeat)
    ap.add_argument("--quick", action="store_true", help="0.2 GB and 1 run")
    args = ap.parse_args()
    if args.quick:
        args.size_gb, args.repeat = 0.2, 1
    return args


def proc_status(field: str) -> int:
    """A byte figure from /proc/self/status (VmRSS, VmHWM)."""
    from pathlib import Path

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    """Reset VmHWM to the current RSS and return it, so a later VmHWM is this call's peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status("VmRSS")


def model_arguments(doc: str | None) -> Any:
    """Parse ``--layers``, ``--width`` (a stack of Linear(width, width)), ``--repeat`` and ``--quick``."""
    import argparse

    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--layers", type=int, default=30, help="Linear(width, width) layers (30 x 4096^2 = 503M)")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="4 layers of 2048, 1 run")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.width, args.repeat = 4, 2048, 1
    return args


def kernel(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with ``WEIGHTSMITH_KERNEL=name`` (``numpy`` or ``compiled``)."""
    def run() -> Any:
        os.environ["WEIGHTSMITH_KERNEL"] = name
        try:
            return fn()
        finally:
            del os.environ["WEIGHTSMITH_KERNEL"]
    return run
