"""`weightsmith.snapshot` of a 2 GB model vs `copy.deepcopy(model.state_dict())`.

Both produce detached copies the model does not share. The restore lines compare writing the
copy back: `restore_` checks every entry first (a checked copy between plain tensors cannot
fail, so no backup is kept for it; a copy from a device into host memory would be backed up),
`load_state_dict` checks as it goes; shown for reference.
Claim: snapshot <= 1x deepcopy.
"""

from __future__ import annotations

import copy
import gc

from _common import size_arguments, medians, table, timed


def main() -> None:
    args = size_arguments(__doc__)
    import torch
    from torch import nn

    from weightsmith.snapshots import restore_, snapshot

    width = 4096
    layers = max(1, round(args.size_gb * 1e9 / 4 / (width * width + width)))
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1, 1)

    def fresh(fn):  # time fn alone, then free what it made before the next run
        def run() -> float:
            gc.collect()
            seconds = timed(fn)
            gc.collect()
            return seconds
        return run

    m = medians({
        "copy.deepcopy(state_dict())": fresh(lambda: copy.deepcopy(model.state_dict())),
        "weightsmith.snapshot": fresh(lambda: snapshot(model)),
    }, args.repeat)
    held = snapshot(model)
    r = medians({
        "model.load_state_dict(copy)": lambda: timed(lambda: model.load_state_dict(held)),
        "weightsmith.restore_": fresh(lambda: restore_(model, held)),
    }, args.repeat)
    gb = held.nbytes / 1e9
    base = m["copy.deepcopy(state_dict())"]
    rows = [("contender", "median (s)", "ratio vs deepcopy")]
    rows += [(k, f"{v:.2f}", f"{v / base:.2f}x") for k, v in m.items()]
    rows += [(k, f"{v:.2f}", "(restore, reference)") for k, v in r.items()]
    print(f"{layers} x Linear({width}, {width}), {gb:.2f} GB float32, "
          f"median of {args.repeat} interleaved runs, {torch.get_num_threads()} threads")
    print(table(rows))


if __name__ == "__main__":
    main()
