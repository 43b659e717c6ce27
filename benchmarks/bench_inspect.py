"""`weightsmith inspect` of a 2 GB checkpoint vs a process that runs `torch.load` on it.

Whole processes, start-up and imports included, medians of interleaved runs, warm page cache.
Claims: >= 20x faster than torch.load for safetensors and a torch zip; about the same time
for a 20 MB file (header-bound); <= 0.3 s for the 20 MB file whatever the format.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import PY, medians, precompile, run_process, size_arguments, state_dict, table


def main() -> None:
    precompile()
    args = size_arguments(__doc__, repeat=7)  # whole processes of ~0.06 s: one slow run moves a median of 3
    import torch
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        files = {}
        for label, gb in (("big", args.size_gb), ("small", 0.02)):
            sd = state_dict(gb)
            files[(label, "safetensors")] = d / f"{label}.safetensors"
            files[(label, "torch zip")] = d / f"{label}.pt"
            save_file(sd, files[(label, "safetensors")])
            torch.save(sd, files[(label, "torch zip")])
            del sd
        for p in files.values():
            p.read_bytes()  # warm the page cache for both contenders
        ws = [PY, "-m", "weightsmith", "inspect"]
        rows = [("file", "format", "weightsmith inspect (s)", "torch.load process (s)", "ratio")]
        results = {}
        for (label, fmt), path in files.items():
            named = {"ws": lambda p=path: run_process([*ws, str(p)])}
            if label == "big":
                named["torch"] = lambda p=path: run_process(
                    [PY, "-c", f"import torch; torch.load({str(p)!r}, weights_only=True)"])
            m = medians(named, args.repeat)
            results[(label, fmt)] = m["ws"]
            size = f"{path.stat().st_size / 1e9:.2f} GB"
            if "torch" in m:
                rows.append((size, fmt, f"{m['ws']:.3f}", f"{m['torch']:.3f}", f"{m['torch'] / m['ws']:.1f}x faster"))
            else:
                rows.append((size, fmt, f"{m['ws']:.3f}", "-", "-"))
        print(table(rows))
        for fmt in ("safetensors", "torch zip"):
            print(f"{fmt}: big/small inspect time ratio {results[('big', fmt)] / results[('small', fmt)]:.2f} "
                  "(1.0 = size does not matter)")
        print(f"median of {args.repeat} interleaved runs each; page cache warm")


if __name__ == "__main__":
    main()
