"""`weightsmith.init_` of a ~500M-parameter model vs `model.apply` with the same `nn.init` calls.

The model is a stack of `nn.Linear(4096, 4096)`; both sides give every weight xavier uniform
values and every bias zeros. init_ runs with a seed (one generator per parameter, seeded from the
name) and without; the baseline draws from the global generator, as `model.apply` code does.
Claim: seeded init_ <= 1.1x the baseline.
"""

from __future__ import annotations

import argparse

from _common import medians, table, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=float, default=500e6, help="parameter count (default 500e6)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="50M parameters and 1 run")
    args = ap.parse_args()
    if args.quick:
        args.params, args.repeat = 50e6, 1
    import torch
    from torch import nn

    from weightsmith import init_

    width = 4096
    layers = max(1, round(args.params / (width * width + width)))
    with torch.device("meta"):  # skip torch's own init at construction; to_empty allocates
        model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    model.to_empty(device="cpu")
    with torch.no_grad():  # touch the memory so neither contender pays its first page faults
        for p in model.parameters():
            p.zero_()

    def apply_init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)

    rules = [(nn.Linear, {"weight": "xavier_uniform", "bias": "zeros"})]
    m = medians({
        "model.apply(nn.init ...)": lambda: timed(lambda: model.apply(apply_init)),
        "init_(seed=0)": lambda: timed(lambda: init_(model, rules, seed=0)),
        "init_ (global RNG)": lambda: timed(lambda: init_(model, rules)),
    }, args.repeat)
    base = m["model.apply(nn.init ...)"]
    count = sum(p.numel() for p in model.parameters())
    rows = [("contender", "median (s)", "ratio vs model.apply")]
    rows += [(k, f"{v:.2f}", f"{v / base:.2f}x") for k, v in m.items()]
    print(f"{layers} x Linear({width}, {width}), {count / 1e6:.0f}M parameters, "
          f"median of {args.repeat} interleaved runs, {torch.get_num_threads()} threads")
    print(table(rows))


if __name__ == "__main__":
    main()
