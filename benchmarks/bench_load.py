"""`weightsmith.load_` into a live 2 GB model vs `model.load_state_dict(safetensors.torch.load_file(...))`.

Each contender runs in a fresh process that builds the model (30 x Linear(4096, 4096), 503M
parameters), then loads the checkpoint into it; timed from just before the load to the end of a
pass that sums every parameter. Peak RSS (VmHWM) is measured above what the process holds once
the model is built, so it shows the memory the load itself adds. Page cache warm.
The peak RSS counts the checkpoint's mapped pages (the page cache's, shared and reclaimable);
private memory (RssAnon, sampled every millisecond) is what the load allocates for itself.
`load_` checks the whole plan and every value first and writes through the model's own
`load_state_dict`; it keeps a backup of what it overwrites only where writing can still fail
(custom loading code, hooks, callable initializers, copies from a device into host memory), so a plain model
is loaded with no second copy. Claim: load_ takes no more memory and no more time than the
manual way (ratios <= 1).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
from pathlib import Path

from _common import PY, model_arguments, precompile, table

CHILD = r'''
import sys, json, time, threading
import torch
from torch import nn
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
class Peak:  # private (anonymous) memory, sampled: mapped file pages are the page cache's
    def __init__(self):
        self.peak, self.stop = rss("RssAnon:"), threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
    def run(self):
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, rss("RssAnon:"))
    def done(self):
        self.stop.set(); self.thread.join()
        return max(self.peak, rss("RssAnon:"))
how, path, layers, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
if how == "weightsmith.load_":
    import weightsmith  # imported before the clock starts, as the manual way's imports are
    import weightsmith.warmstart.load, weightsmith.checkpoint
else:
    import safetensors.torch
base, anon = rss("VmRSS:"), rss("RssAnon:")
peak = Peak()
t0 = time.perf_counter()
if how == "weightsmith.load_":
    weightsmith.load_(model, path)
else:
    model.load_state_dict(safetensors.torch.load_file(path))
with torch.no_grad():
    total = sum(float(p.sum()) for p in model.parameters())
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak": rss("VmHWM:") - base, "private": peak.done() - anon,
                  "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
'''


def main() -> None:
    precompile()
    args = model_arguments(__doc__)
    import torch
    from torch import nn

    import weightsmith

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        path = Path(tmp) / "m.safetensors"
        weightsmith.save(nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)]), path)
        path.read_bytes()  # warm page cache for every contender
        runs: dict[str, list[dict[str, float]]] = {"weightsmith.load_": [], "load_state_dict(load_file)": []}
        for i in range(args.repeat):
            for how in runs if i % 2 == 0 else reversed(list(runs)):
                out = subprocess.run([PY, "-c", CHILD, how, str(path), str(args.layers), str(args.width)],
                                     capture_output=True, text=True, check=True)
                runs[how].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {h: statistics.median(r["seconds"] for r in rs) for h, rs in runs.items()}
    peak = {h: statistics.median(r["peak"] for r in rs) for h, rs in runs.items()}
    private = {h: statistics.median(r["private"] for r in rs) for h, rs in runs.items()}
    nbytes = runs["weightsmith.load_"][0]["param_bytes"]
    rows = [("contender", "median s", "peak RSS added", "private memory added", "private / param bytes")]
    for how in runs:
        rows.append((how, f"{med[how]:.2f}", f"{peak[how] / 2**30:.2f} GiB", f"{private[how] / 2**30:.2f} GiB",
                     f"{private[how] / nbytes:.2f}"))
    base = "load_state_dict(load_file)"
    rows.append(("ratio load_ / manual", f"{med['weightsmith.load_'] / med[base]:.2f}",
                 f"{peak['weightsmith.load_'] / max(peak[base], 1):.2f}", "", ""))
    print(f"{args.layers} x Linear({args.width}, {args.width}), {nbytes / 1e9:.2f} GB float32; "
          f"median of {args.repeat} fresh processes, alternating; page cache warm")
    print(table(rows))


if __name__ == "__main__":
    main()
