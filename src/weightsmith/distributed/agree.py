"""Agreement across ranks: every rank learns every rank's failure, so all raise or none does.

Each function is collective when a process group is initialized (every rank calls it) and a
plain local step without one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..errors import PlanError, WeightsmithError

__all__ = ["initialized", "agree", "describe", "raise_agreed", "broadcast", "rank_in"]


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()

# -- agreeing across ranks ----------------------------------------------------------------------
def agree(error: BaseException | None, group: Any = None) -> list[tuple[int, str]]:
    """Every rank's failure, ``(rank, message)``; empty when all succeeded. Collective.

    One ``all_reduce`` of a success flag in the common case; the messages are gathered only
    when some rank failed.
    """
    if not initialized():
        return [] if error is None else [(0, describe(error))]
    flag = torch.tensor([0 if error is not None else 1], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    if int(flag.item()) == 1:
        return []
    messages: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, None if error is None else describe(error), group=group)
    return [(rank, m) for rank, m in enumerate(messages) if m is not None]

def describe(error: BaseException) -> str:
    """One line per failure; DCP's ``CheckpointException`` is opened up into its ranks' errors."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        return "; ".join(f"rank {rank}: {describe(exc)}" for rank, (exc, _trace) in sorted(failures.items()))
    return f"{type(error).__name__}: {error}"

def raise_agreed(error: BaseException | None, failures: list[tuple[int, str]], what: str, *,
                  kind: type[WeightsmithError] = PlanError, outcome: str = "nothing was changed on any rank") -> None:
    """Raise on every rank once any rank failed: the rank's own error, else a ``kind`` naming the others."""
    if not failures:
        return
    if error is not None:
        raise error
    lines = [f"rank {rank}: {message}" for rank, message in failures]
    agreed = kind("\n  - ".join([f"{what} failed on {len(failures)} rank(s); {outcome}:", *lines]))
    if isinstance(agreed, PlanError):
        agreed.problems = tuple(lines)
    raise agreed

def broadcast(value: Any, group: Any = None) -> Any:
    """Rank 0's ``value`` on every rank (as is without a process group)."""
    if not initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, group=group, group_src=0)
    return box[0]

def rank_in(group: Any = None) -> int:
    return dist.get_rank(group) if initialized() else 0
