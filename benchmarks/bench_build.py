"""`build` of a 2 GB, 500M-parameter model vs (a) the naive way and (b) the best manual way.

Each contender runs in a fresh process, timed from just after `import torch` to the end of a
pass that touches every parameter (a sum), for the model saved as safetensors and as a torch
zip; peak RSS (VmHWM) is measured above what the process holds after `import torch`.
(a) construct with default init, read the whole file, `load_state_dict`.
(b) construct on meta, read memory-mapped, `load_state_dict(assign=True)`, touch every page.
Claims: build <= 0.6x (b)'s time, >= 5x faster than (a), peak <= 1.15x the parameter bytes.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import PY, model_arguments, precompile, table

CHILD = r'''
import sys, json, time
import torch
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base = rss("VmRSS:")
t0 = time.perf_counter()
from torch import nn
layers, width = int(sys.argv[3]), int(sys.argv[4])
def factory():
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
how, path = sys.argv[1], sys.argv[2]
if how == "naive":
    model = factory()
    sd = (__import__("safetensors.torch").torch.load_file(path) if path.endswith(".safetensors")
          else torch.load(path, weights_only=True))
    model.load_state_dict(sd)
    del sd
elif how == "manual":
    with torch.device("meta"):
        model = factory()
    sd = (__import__("safetensors.torch").torch.load_file(path) if path.endswith(".safetensors")
          else torch.load(path, weights_only=True, mmap=True))
    model.load_state_dict(sd, assign=True)
    del sd
else:
    import weightsmith
    model, _ = weightsmith.build(factory, path)
with torch.no_grad():
    total = sum(float(p.sum()) for p in model.parameters())
elapsed = time.perf_counter() - t0
print(json.dumps({"seconds": elapsed, "peak_above_import": rss("VmHWM:") - base,
                  "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
'''


def main() -> None:
    precompile()
    args = model_arguments(__doc__)
    import torch
    from torch import nn

    import weightsmith

    with tempfile.TemporaryDirectory() as tmp:
        model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)])
        files = {"safetensors": Path(tmp) / "m.safetensors", "torch zip": Path(tmp) / "m.pt"}
        weightsmith.save(model, files["safetensors"])
        torch.save(model.state_dict(), files["torch zip"])
        del model
        for f in files.values():
            f.read_bytes()  # warm page cache for every contender
        rows = [("format", "contender", "median s", "peak above import", "peak / param bytes")]
        for fmt, path in files.items():
            runs: dict[str, list[dict[str, float]]] = {"naive": [], "manual": [], "build": []}
            for _ in range(args.repeat):
                for how in runs:
                    out = subprocess.run([PY, "-c", CHILD, how, str(path), str(args.layers), str(args.width)],
                                         capture_output=True, text=True, check=True)
                    runs[how].append(json.loads(out.stdout.strip().splitlines()[-1]))
            med = {h: statistics.median(r["seconds"] for r in rs) for h, rs in runs.items()}
            for how, rs in runs.items():
                peak = statistics.median(r["peak_above_import"] for r in rs)
                rows.append((fmt, how, f"{med[how]:.2f}", f"{peak / 2**30:.2f} GiB",
                             f"{peak / rs[0]['param_bytes']:.2f}"))
            rows.append((fmt, "ratios", f"build/manual {med['build'] / med['manual']:.2f}",
                         f"naive/build {med['naive'] / med['build']:.1f}x", ""))
        print(f"{args.layers} x Linear({args.width}, {args.width}); median of {args.repeat} fresh processes; "
              "page cache warm")
        print(table(rows))


if __name__ == "__main__":
    sys.exit(main())
