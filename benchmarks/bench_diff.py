"""`weightsmith.diff` of two 1 GB checkpoints (every tensor slightly changed) vs reading both once.

Baseline: open both files with `weightsmith.open` and `torch.sum` every tensor of both (memory-
mapped, so every byte is touched once, on torch's threads). Both sides reopen the files for
every run, so both pay the same page-mapping cost; the page cache is warm. The files carry no
checksums, so diff reads every pair. Claim: throughput >= 0.5 x the baseline's.

diff runs twice: with the compiled single-pass kernel (numba, the ``fast`` extra; loaded before
timing, as torch is imported before timing the baseline; its one-off load in a fresh process is
printed on its own) and with the numpy kernel, which needs nothing beyond numpy.

Memory is measured in a fresh child process: the peak RSS (VmHWM, reset through
/proc/self/clear_refs just before the call) minus the RSS just before the call, after
`import torch, weightsmith` and a warm-up diff of two tiny dicts. RSS counts the file pages
mapped into the process, so pages diff has read count until it releases them (once a pair is
done); the largest pair (one tensor of each file) is subtracted to give what diff adds on top of
the data it must hold. Claim: <= 64 MB above the largest pair.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import kernel, proc_status, reset_peak, PY, medians, table, timed

MB = 2**20


def write_pair(a: Path, b: Path, total_gb: float, tensors: int) -> int:
    """Two float32 safetensors files of ``tensors`` equal 2-D tensors; ``b = a + 1e-3 * noise``.

    Written one tensor at a time (8-byte header length, JSON header, raw bytes), so neither
    file is ever held in memory. Returns the bytes of one tensor.
    """
    import torch

    cols = 1024
    rows = max(1, int(total_gb * 1e9 / 4 / tensors / cols))
    nbytes = rows * cols * 4
    header = {f"layers.{i}.weight": {"dtype": "F32", "shape": [rows, cols],
                                      "data_offsets": [i * nbytes, (i + 1) * nbytes]} for i in range(tensors)}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    g = torch.Generator().manual_seed(0)
    with open(a, "wb") as fa, open(b, "wb") as fb:
        for f in (fa, fb):
            f.write(len(text).to_bytes(8, "little") + text)
        for _ in range(tensors):
            x = torch.randn(rows, cols, generator=g)
            fa.write(x.numpy().tobytes())
            fb.write((x + 1e-3 * torch.randn(rows, cols, generator=g)).numpy().tobytes())
    return nbytes


def write_tiny(folder: Path) -> tuple[Path, Path]:
    """Two small files, for a first diff that loads the compiled kernel."""
    import torch
    from safetensors.torch import save_file

    a, b = folder / "tiny-a.safetensors", folder / "tiny-b.safetensors"
    save_file({"w": torch.ones(64)}, a)
    save_file({"w": torch.zeros(64)}, b)
    return a, b


def warm(*paths: Path) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(64 * MB):
                pass


def read_both(a: Path, b: Path) -> float:
    import weightsmith

    total = 0.0
    for path in (a, b):
        ckpt = weightsmith.open(path)
        total += sum(float(ckpt.tensor(k).sum()) for k in ckpt)
    return total


def read_files(a: Path, b: Path) -> int:
    """Read both files' bytes once from the page cache, in 64 MB pieces (no parsing)."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    total = 0
    for path in (a, b):
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def child_memory(how: str, a: str, b: str) -> None:
    """Print the growth of peak RSS over one call, in bytes (run in a fresh process). The
    compiled kernel is loaded first, as a fixed cost of the process (see `kernel_load`)."""
    import torch

    import weightsmith
    from weightsmith import _measure

    _measure.fused_available()

    weightsmith.diff({"w": torch.ones(3)}, {"w": torch.zeros(3)})  # load what diff imports, start once
    before = reset_peak()
    if how == "diff":
        result = weightsmith.diff(a, b)
        assert not result.equal and len(result.changed) == len(result.tensors)
    else:
        read_both(Path(a), Path(b))
    print(proc_status("VmHWM") - before)



def kernel_load() -> tuple[float, int]:
    """Seconds and RSS bytes of loading the compiled kernel in a fresh process (cache warm)."""
    code = ("import time, numpy as np\n"
            "from weightsmith import _measure\n"
            "def rss(): return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) * 1024\n"
            "r, t = rss(), time.perf_counter()\n"
            "_measure.fused_available(); a = np.ones(9, np.float32)\n"
            "_measure.compare(a, a, 0.0, 0.0, _measure.Scratch(), fused=True)\n"
            "print(time.perf_counter() - t, rss() - r)")
    runs = [subprocess.run([PY, "-c", code], check=True, capture_output=True, text=True).stdout.split()
            for _ in range(3)]
    seconds, rss = sorted(runs)[1]
    return float(seconds), int(rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-gb", type=float, default=1.0, help="size of each checkpoint")
    ap.add_argument("--tensors", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="0.1 GB and 1 run")
    ap.add_argument("--child-memory", nargs=3, metavar=("HOW", "A", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_memory:
        child_memory(*args.child_memory)
        return
    if args.quick:
        args.size_gb, args.repeat = 0.1, 1
    import weightsmith

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        a, b = Path(tmp) / "a.safetensors", Path(tmp) / "b.safetensors"
        largest = write_pair(a, b, args.size_gb, args.tensors)
        warm(a, b)
        nbytes = a.stat().st_size + b.stat().st_size
        load_s, load_rss = kernel_load()
        # the compiled kernel loaded before timing, as torch is imported before timing the baseline
        kernel("compiled", lambda: weightsmith.diff(*write_tiny(Path(tmp))))()
        m = medians({"weightsmith.diff": kernel("compiled", lambda: timed(lambda: weightsmith.diff(a, b))),
                     "weightsmith.diff, numpy kernel": kernel("numpy", lambda: timed(lambda: weightsmith.diff(a, b))),
                     "read both (torch.sum)": lambda: timed(lambda: read_both(a, b)),
                     "read both files (readinto)": lambda: timed(lambda: read_files(a, b))}, args.repeat)
        peaks = {how: int(subprocess.run([PY, __file__, "--child-memory", how, str(a), str(b)], check=True,
                                         capture_output=True, text=True).stdout.strip().splitlines()[-1])
                 for how in ("diff", "read")}
    base = m["read both (torch.sum)"]
    rows = [("contender", "median s", "GB/s", "throughput vs torch.sum read", "peak RSS growth")]
    for name, how in (("weightsmith.diff", "diff"), ("weightsmith.diff, numpy kernel", None),
                      ("read both (torch.sum)", "read"),
                      ("read both files (readinto)", None)):
        rows.append((name, f"{m[name]:.3f}", f"{nbytes / m[name] / 1e9:.2f}", f"{base / m[name]:.2f}x",
                     f"{peaks[how] / MB:.0f} MB" if how else "-"))
    print(f"two {args.size_gb} GB float32 checkpoints, {args.tensors} tensors each, every tensor changed; "
          f"median of {args.repeat} interleaved runs, page cache warm; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(table(rows))
    print(f"largest pair: {2 * largest / MB:.0f} MB; diff's peak RSS above it: "
          f"{(peaks['diff'] - 2 * largest) / MB:.0f} MB (claim <= 64 MB); "
          f"throughput ratio {base / m['weightsmith.diff']:.2f} vs summing every mapped byte, "
          f"{m['read both files (readinto)'] / m['weightsmith.diff']:.2f} vs reading both files (claim >= 0.5)")
    print(f"the compiled kernel (numba, the fast extra) loads once per process in {load_s:.2f} s and "
          f"{load_rss / MB:.0f} MB (median of 3 fresh processes, its cache warm); below "
          f"{_measure_min_gb():.0f} GiB compared, diff uses the numpy kernel unless it is loaded already")


def _measure_min_gb() -> float:
    from weightsmith import _measure

    return _measure.FUSED_MIN_BYTES / 2**30


if __name__ == "__main__":
    sys.exit(main())
