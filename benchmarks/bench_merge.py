"""`weightsmith.merge` of 3 inputs x 1 GB (float32 safetensors), linear and ties, against
reading every input once and against the naive way.

Contenders, each in a fresh process, timed from just after the imports to the end of the write:

- ``read``: map each input with `weightsmith.open` and sum every tensor with torch (every
  byte of every input read once, nothing written): the floor of any merge's reading.
- ``write``: the output's size written once past the page cache (O_DIRECT) and fsynced: the
  floor of any merge's durable writing on this disk.
- ``ws linear`` / ``ws ties``: `weightsmith.merge` (ties: input 0 is the base, density 0.5),
  streamed to a safetensors file, fsynced and renamed into place.
- ``naive linear`` / ``naive ties``: `safetensors.torch.load_file` of every input, the merge
  in torch on whole tensors (ties: ``torch.topk`` trim, sign election, disjoint mean), then
  `save_file` and an fsync (the same durability as weightsmith's output).

The page cache is warm (every input is read once before the runs); outputs are deleted between
runs. Peak RSS is the growth of VmHWM from just after the imports: it counts mapped input
pages, not the page cache of the file being written. Every child runs under a 10 GiB address
space limit. Goals: ws linear >= 0.5x the speed of ``read``; ws vs naive >= 3x faster and
<= 0.3x peak memory.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from _common import PY, precompile, size_arguments, state_dict, table

MB = 2**20

CHILD = r'''
import json, os, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (10 * 2**30, 10 * 2**30))
import torch
import safetensors.torch
import weightsmith as ws
import importlib
for name in ("weightsmith.merging.run", "weightsmith.merging.lora", "weightsmith.checkpoint", "weightsmith.io.safetensors",
             "weightsmith.io.atomic", "weightsmith.warmstart.load"):
    importlib.import_module(name)  # imports are not the merge's memory

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

how, out, *paths = sys.argv[1:]

def read_all():
    total = 0.0
    for p in paths:
        ckpt = ws.open(p)
        for k in ckpt:
            total += float(ckpt.tensor(k).sum())
            ckpt.release(k)
    return total

def naive_ties(base, xs, density=0.5):
    deltas = []
    for x in xs:
        tau = (x - base).flatten()
        k = max(1, int(density * tau.numel()))
        keep = torch.zeros_like(tau, dtype=torch.bool)
        keep[torch.topk(tau.abs(), k).indices] = True
        deltas.append(tau * keep)
    d = torch.stack(deltas)
    elected = torch.where(d.sum(0) >= 0, 1.0, -1.0)
    agree = d.sign() == elected
    div = agree.sum(0).clamp(min=1)
    return base + ((d * agree).sum(0) / div).view_as(base)

def naive(method):
    states = [safetensors.torch.load_file(p) for p in paths]
    if method == "linear":
        merged = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
    else:
        merged = {k: naive_ties(states[0][k], [s[k] for s in states[1:]]) for k in states[0]}
    safetensors.torch.save_file(merged, out)
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := current RSS
base = status("VmRSS")
t0 = time.perf_counter()
if how == "read":
    read_all()
elif how == "write":  # the output's bytes written once past the page cache and fsynced: the disk's floor
    import mmap
    size = sum(info.nbytes for info in ws.open(paths[0]).values())
    block = mmap.mmap(-1, 4 << 20)
    block.write(b"\1" * len(block))
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0))
    for _ in range(-(-size // len(block))):
        os.write(fd, block)
    os.fsync(fd)
    os.close(fd)
elif how == "ws-linear":
    ws.merge(paths, out, method="linear")
elif how == "ws-ties":
    ws.merge(paths[1:], out, method="ties", base=paths[0], density=0.5)
else:
    naive(how.split("-")[1])
print(json.dumps({"seconds": time.perf_counter() - t0, "peak": status("VmHWM") - base}))
'''

CONTENDERS = ["read", "write", "ws-linear", "naive-linear", "ws-ties", "naive-ties"]


def main() -> None:
    args = size_arguments(__doc__, size_gb=1.0, repeat=3)
    precompile()
    import weightsmith as ws

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        folder = Path(tmp)
        paths = []
        for i in range(3):
            p = folder / f"in{i}.safetensors"
            state = state_dict(args.size_gb, seed=i)
            ws.save(state, p, checksums=False)
            del state
            paths.append(str(p))
        for p in paths:  # warm the page cache
            with open(p, "rb") as f:
                while f.read(64 * MB):
                    pass
        largest = max(info.nbytes for info in ws.open(paths[0]).values())
        largest_total = sum(info.nbytes for info in ws.open(paths[0]).values())
        out = folder / "out.safetensors"
        samples: dict[str, list[dict[str, float]]] = {c: [] for c in CONTENDERS}
        for _ in range(args.repeat):
            for how in CONTENDERS:
                res = subprocess.run([PY, "-c", CHILD, how, str(out), *paths], check=True, capture_output=True,
                                     text=True)
                samples[how].append(json.loads(res.stdout.strip().splitlines()[-1]))
                if out.exists():
                    out.unlink()
    med = {c: {k: statistics.median(s[k] for s in v) for k in ("seconds", "peak")} for c, v in samples.items()}
    gb = 3 * args.size_gb
    rows = [("contender", "median s", "GB/s read", "peak RSS MB")]
    for c in CONTENDERS:
        rows.append((c, f"{med[c]['seconds']:.2f}", f"{gb / med[c]['seconds']:.2f}", f"{med[c]['peak'] / MB:.0f}"))
    print(f"3 inputs x {args.size_gb:g} GB float32, {args.repeat} run(s), page cache warm; largest tensor "
          f"{largest / MB:.0f} MB, bound (N+1) x largest + 64 MB = {(4 * largest) / MB + 64:.0f} MB")
    print(table(rows))
    r, floor = med["read"]["seconds"], med["write"]["seconds"]
    for m in ("linear", "ties"):
        w, n = med[f"ws-{m}"], med[f"naive-{m}"]
        print(f"{m}: speed vs read {r / w['seconds']:.2f}x, vs read + write {(r + floor) / w['seconds']:.2f}x; "
              f"vs naive {n['seconds'] / w['seconds']:.2f}x faster, peak {w['peak'] / max(n['peak'], 1):.2f}x")
    print(f"write: the output's {largest_total / 1e9:.2f} GB written once with O_DIRECT and fsynced, "
          f"{largest_total / floor / 1e9:.2f} GB/s (this disk's floor for any merge that keeps its output)")


if __name__ == "__main__":
    main()
