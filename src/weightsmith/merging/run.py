"""`merge`: compute a `MergePlan` one output tensor at a time and write it atomically.

Inputs are memory-mapped; each output tensor is computed chunk by chunk (see
`weightsmith.merging.methods`), written, and the input pages it read are released before the
next, so peak memory stays near (inputs + 1) × the largest tensor. A plan with problems stops
before any tensor is read; a failure while merging leaves the output path as it was.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .._result import Result
from ..io._base import read_in
from ..errors import PlanError
from .methods import combine
from ._write import Stream, write
from .plan import Input, MergePlan, build, params_of

__all__ = ["merge", "MergeReport", "MERGED_FROM_KEY"]

Progress = Callable[[int, int, str], None]
MERGED_FROM_KEY = "weightsmith.merge"  # metadata: JSON of the method, sources and parameters


@dataclass
class MergeReport(Result):
    """What `merge` wrote.

    Attributes:
        path: the file or folder written, or the model's class name; ``format`` is
            ``safetensors``, ``sharded``, ``torch`` or ``model``.
        files: every file written.
        tensors: output keys, tied keys included; ``nbytes`` bytes of data (ties once).
        method, sources: as planned; ``counts`` how many keys were merged, copied, tied.
    """

    SCHEMA: ClassVar[str] = "weightsmith.merge/1"
    path: str
    format: str
    files: list[str]
    tensors: int
    nbytes: int
    method: str
    sources: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    ties: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def _rich_(self) -> str:
        from ..listing import human_bytes

        how = ", ".join(f"{v} {k}" for k, v in self.counts.items())
        text = (f"merged {len(self.sources)} model(s) with {self.method} into {self.format} {self.path}: "
                f"{self.tensors} tensors ({human_bytes(self.nbytes)}; {how})")
        return "\n".join([text, *(f"note: {n}" for n in self.notes)])


def merge(sources: Sequence[Any], out: Any, *, method: str = "linear", base: Any = None,
          weights: Sequence[Any] | None = None, dtype: Any = None, max_shard_size: int | str | None = None,
          progress: Progress | None = None, trust: bool = False, **params: Any) -> MergeReport:
    """Merge checkpoints into a file, a sharded folder or a live model.

    The plan (`merge_plan`) is made and checked first, from headers alone; then each output
    tensor is computed from the memory-mapped inputs, accumulated in float32 (float64 for
    float64 inputs), cast to the output dtype and written. Inputs are never modified.

    Args:
        sources, method, base, weights, dtype, trust, **params: as for `merge_plan`.
        out: a path (``.safetensors``, or ``.pt``/``.pth``/``.bin``/``.ckpt`` for a torch file;
            a folder of shards with ``max_shard_size``), written atomically; or an ``nn.Module``,
            loaded all or nothing through `weightsmith.load_`. A torch file or a model gets the
            whole merged state dict in memory at once.
        max_shard_size: write a Hugging Face sharded folder with shards of at most this size.
        progress: called as ``progress(done_bytes, total_bytes, key)``.

    Raises:
        PlanError: the plan has problems (listed in ``problems``); nothing was read or written.
        UsageError: bad arguments, or ``out`` is one of the inputs.
        SaveError, CheckpointError: writing or reading failed; ``out`` is as it was.

    >>> import weightsmith as ws                                                          # doctest: +SKIP
    >>> ws.merge(["a.safetensors", "b.safetensors"], "soup.safetensors", weights=[0.7, 0.3])  # doctest: +SKIP
    """
    plan, inputs = build(sources, method=method, base=base, weights=weights, dtype=dtype, trust=trust, **params)
    if plan.problems:
        for i in inputs:
            i.close()
        raise PlanError(f"the merge plan has {len(plan.problems)} problem(s); nothing was read:\n  "
                        + "\n  ".join(plan.problems[:20]), problems=plan.problems)
    job = _Job(plan, inputs, params)
    stream = Stream([(st.key, st.shape, st.dtype) for st in job.stored], job.tensor, job.release, job.ties,
                    job.metadata(), progress, [i.path for i in inputs if i.path is not None])
    job.streaming = lambda: stream.streaming
    try:
        where, fmt, files = write(stream, out, max_shard_size=max_shard_size)
    finally:
        for i in inputs:
            i.close()
    return MergeReport(where, fmt, files, len(plan.steps), stream.total, plan.method, list(plan.sources),
                       plan.counts(), dict(job.ties), list(plan.notes))


class _Job:
    """The plan, its inputs, and the output tensors computed on request."""

    def __init__(self, plan: MergePlan, inputs: list[Input], raw: dict[str, Any]) -> None:
        self.plan, self.inputs, self.raw = plan, inputs, raw
        self.stored = [s for s in plan.steps if s.how != "tied"]
        self.by_key = {s.key: s for s in self.stored}
        self.ties = {s.key: s.tied_to for s in plan.steps if s.how == "tied" and s.tied_to is not None}
        self._held: list[tuple[int, str]] = []
        self.streaming: Callable[[], bool] = lambda: False
        self._scratch: Any = None  # one output buffer reused while tensors are written one at a time

    def tensor(self, key: str) -> Any:
        """The output tensor of ``key``, computed now."""
        import torch

        from ..io._dtypes import to_torch

        step = self.by_key[key]
        reads = []
        for i, k in step.reads:
            t = self.inputs[i].tensor(k)
            if self.inputs[i].path is not None:  # mapped: fault the pages in at once, errors raised here
                read_in(t, f"{self.inputs[i].name}: {k}")
            reads.append(t)
        self._held = list(step.reads)
        target = to_torch(step.dtype)
        if step.how in ("copy", "layer"):
            t = reads[0]
            return t.to(target) if t.dtype != target else t
        flat = [r.reshape(-1) for r in reads]
        base = flat[0] if self.plan.base is not None else None
        xs = flat[1:] if base is not None else flat
        out = self._output(step.nbytes, target, int(torch.Size(step.shape).numel()))
        combine(self.plan.method, xs, base, params_of(step, self.plan, self.raw), out, key=step.key)
        return out.view(step.shape)

    def _output(self, nbytes: int, dtype: Any, numel: int) -> Any:
        """A flat output tensor: a view of one reused buffer when the writer takes one tensor at a time."""
        import torch

        if not self.streaming():
            return torch.empty(numel, dtype=dtype)
        if self._scratch is None:
            self._scratch = torch.empty(max(s.nbytes for s in self.stored), dtype=torch.uint8)
        return self._scratch[:nbytes].view(dtype)

    def release(self) -> None:
        """Drop the input pages the last tensor read."""
        for i, k in self._held:
            self.inputs[i].release(k)
        self._held = []

    def metadata(self) -> dict[str, str]:
        about = {"method": self.plan.method, "sources": self.plan.sources, "base": self.plan.base,
                 "parameters": self.plan.parameters}
        return {"format": "pt", MERGED_FROM_KEY: json.dumps(about, separators=(",", ":"))}
