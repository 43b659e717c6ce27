"""`weightsmith.save` of a 2 GB state dict to safetensors vs `save_file` + fsync and `torch.save` + fsync.

The baselines are made durable (fsync), as weightsmith's save is; weightsmith also writes per-tensor
CRC-32 checksums and renames atomically. `safetensors.torch.save_file` (no fsync) is shown for
reference. Claims: <= 1x of each durable baseline.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from _common import size_arguments, medians, state_dict, table, timed


def main() -> None:
    args = size_arguments(__doc__)
    import torch
    from safetensors.torch import save_file

    import weightsmith

    sd = state_dict(args.size_gb)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        d = Path(tmp)

        def torch_fsync() -> None:
            with open(d / "t.pt", "wb") as f:
                torch.save(sd, f)
                f.flush()
                os.fsync(f.fileno())

        def save_file_fsync() -> None:
            save_file(sd, d / "f.safetensors")
            fd = os.open(d / "f.safetensors", os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        def clean(fn):
            # each contender starts with no old file to unlink and no other writer's dirty pages
            # still being flushed (save_file does not fsync; its writeback would slow the next one)
            def run() -> float:
                for f in d.iterdir():
                    f.unlink()
                os.sync()
                return timed(fn)
            return run

        m = medians({
            "weightsmith.save": clean(lambda: weightsmith.save(sd, d / "w.safetensors")),
            "safetensors save_file + fsync": clean(save_file_fsync),
            "torch.save + fsync": clean(torch_fsync),
            "safetensors save_file (no fsync)": clean(lambda: save_file(sd, d / "s.safetensors")),
        }, args.repeat)
    base, st = m["torch.save + fsync"], m["safetensors save_file + fsync"]
    rows = [("contender", "median (s)", "ratio vs save_file + fsync", "ratio vs torch.save + fsync")]
    rows += [(k, f"{v:.2f}", f"{v / st:.2f}x", f"{v / base:.2f}x") for k, v in m.items()]
    print(f"{args.size_gb} GB float32 state dict, median of {args.repeat} interleaved runs, "
          "each after os.sync() with no file to replace")
    print(table(rows))


if __name__ == "__main__":
    main()
