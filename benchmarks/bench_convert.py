"""`weightsmith.convert` of a 2 GB torch zip (`torch.save`) to safetensors vs `torch.load` +
`safetensors.torch.save_file`.

Each contender runs in a fresh process, with the page cache warm (the source is read once
beforehand), timed from just after `import torch, weightsmith, safetensors` to the end of the
write; its output is deleted between runs. Peak RSS is the growth of VmHWM over the same span:
the RSS after the imports is subtracted. It counts the source pages mapped into the process
(convert releases each tensor's pages once written; `torch.load` copies the whole file into
memory) and not the page cache of the file being written.

weightsmith.convert fsyncs its output before the atomic rename (and writes a CRC-32 per
tensor); save_file does neither, so "save_file + fsync" is shown for equal durability.
Claims: time ratio <= 1 and peak RSS ratio <= 0.3 against `torch.load` + `save_file`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import size_arguments, PY, state_dict, table

MB = 2**20

CHILD = r'''
import json, os, sys, time
import torch
import safetensors.torch
import weightsmith

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

how, src, dst = sys.argv[1:4]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := current RSS
base = status("VmRSS")
t0 = time.perf_counter()
if how.startswith("convert"):
    weightsmith.convert(src, dst, verify=how.endswith("verify"))
else:
    state = torch.load(src, weights_only=True)
    safetensors.torch.save_file(state, dst)
    if how.endswith("fsync"):
        fd = os.open(dst, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    del state
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak": status("VmHWM") - base}))
'''

CONTENDERS = {
    "weightsmith.convert": "convert",
    "torch.load + save_file": "baseline",
    "torch.load + save_file + fsync": "baseline-fsync",
    "weightsmith.convert(verify=True)": "convert-verify",
}
BASELINE = "torch.load + save_file"


def main() -> None:
    args = size_arguments(__doc__)
    import torch

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        src, dst = Path(tmp) / "model.pt", Path(tmp) / "out.safetensors"
        sd = state_dict(args.size_gb)
        torch.save(sd, src)
        del sd
        with open(src, "rb") as f:  # warm the page cache for every contender
            while f.read(64 * MB):
                pass
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in CONTENDERS}
        for _ in range(args.repeat):
            for name, how in CONTENDERS.items():
                out = subprocess.run([PY, "-c", CHILD, how, str(src), str(dst)], capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{name} failed:\n{out.stderr}")
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                dst.unlink()
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak")} for name, rs in runs.items()}
    base = med[BASELINE]
    rows = [("contender", "median s", f"time vs {BASELINE}", "peak RSS growth", "peak RSS ratio")]
    for name, m in med.items():
        rows.append((name, f"{m['seconds']:.2f}", f"{m['seconds'] / base['seconds']:.2f}x",
                     f"{m['peak'] / MB:.0f} MB", f"{m['peak'] / base['peak']:.3f}"))
    print(f"{args.size_gb} GB float32 torch zip (50 tensors) -> safetensors; median of {args.repeat} fresh "
          "processes per contender; page cache warm")
    print(table(rows))
    ours = med["weightsmith.convert"]
    print(f"claims: time ratio {ours['seconds'] / base['seconds']:.2f} (<= 1), "
          f"peak RSS ratio {ours['peak'] / base['peak']:.3f} (<= 0.3)")


if __name__ == "__main__":
    sys.exit(main())
