"""`load_sharded_`: any checkpoint into a model sharded across ranks, all or nothing on every rank.

Every rank makes the same plan (`warmstart.execute.checked`), reads and checks only its own
part, agrees with the others (`agree`) and only then writes its shards. The same reading and
staging loads a DCP folder into a plain model without a second copy (`load_dcp_in_place`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .._tensors import is_dtensor
from .._slots import uninterrupted, write_mode
from ..errors import CheckpointError, PlanError, UsageError, WeightsmithError
from ..io.dcp import DcpReader
from ..warmstart.execute import LoadReport, checked, fill_missing, report_of, value_of, written_keys
from ..warmstart.plan import LoadPlan, Source
from ..warmstart.transforms import Cast
from .agree import agree, describe, initialized, raise_agreed, rank_in
from .reader import WeightsmithDcpReader

__all__ = ["is_sharded", "load_sharded_", "load_dcp_in_place"]


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is a ``DTensor``.

    >>> is_sharded(torch.nn.Linear(2, 2))
    False
    """
    return any(is_dtensor(t) for t in (*model.parameters(), *model.buffers()))

# -- loading into sharded models ----------------------------------------------------------------
@torch.no_grad()
def load_sharded_(model: torch.nn.Module, source: Any, *, plan: LoadPlan | None = None, strict: bool = True,
                  min_coverage: float = 0.5, seed: int | None = None, tied: str | Sequence[str] = "error",
                  **plan_options: Any) -> LoadReport:
    """Load a checkpoint into a model sharded across ranks, all or nothing on every rank.

    Every rank of the default process group calls it. The plan is made on every rank from key
    names and global shapes (prefixes, renames, adapters and structural matching work as for
    `load_`). Each rank then reads only its own part: from a DCP folder through ``dcp.load``
    with `WeightsmithDcpReader`, DCP's planner laying the reads onto its shards (only the
    chunks that overlap them), from a single file or a sharded folder just the slice it owns.
    Each read is staged in place: its region of the file's memory map is read in (the bytes
    fetched into the page cache and checked, so a damaged or shrunk file fails here) and held,
    adding no private memory. A value with a rename transform (concat, split, transpose) or an
    adapter is read whole into a buffer, transformed, then sliced. The ranks then agree by a
    collective that every rank's reads and checks succeeded; only then does each rank copy
    into its local shards. One rank's failure fails all, and no rank's model is changed.

    Args:
        model: the ``nn.Module`` whose parameters are ``DTensor`` shards (``distribute_tensor``,
            FSDP2 ``fully_shard``); plain tensors in it (replicated buffers) get the full value.
        source, plan, strict, min_coverage, seed, tied, **plan_options: as for `load_` (a tie
            given two values by the source is compared whole, on every rank).

    Returns:
        a `LoadReport`, the same on every rank.

    >>> import weightsmith                                                   # doctest: +SKIP
    >>> weightsmith.load_(sharded_model, "ckpt/step-100")   # every rank      # doctest: +SKIP
    """
    if not initialized():
        raise UsageError("load_sharded_ needs an initialized process group (torch.distributed.init_process_group); "
                         "for a model in one process use weightsmith.load_")
    error: BaseException | None = None
    work: _Work | None = None
    try:
        work = _prepare(model, source, plan, dict(plan_options), strict=strict, min_coverage=min_coverage,
                        tied=tied)
    except Exception as e:  # any failure on one rank must reach the others, or they wait forever
        error = e
    raise_agreed(error, agree(error), "planning the load")
    assert work is not None  # no rank failed
    try:
        work.read_collective()  # every rank, same order: DCP reads, whole values for adapters
        staged: dict[str, torch.Tensor] = {}
        try:
            staged = work.stage()
        except Exception as e:
            error = e
        raise_agreed(error, agree(error), "staging the load")
        with uninterrupted():  # Ctrl-C waits until this rank's shards are whole
            work.commit(staged)
    finally:
        work.close()
    fill_missing(model, work.plan, seed=seed)
    return report_of(work.plan)

class _Work:
    """One rank's share of a sharded load: the plan, the boxes it owns, and its staged reads.

    A value the plan takes as stored (a cast at most) is never copied twice: from a DCP folder,
    DCP plans its reads straight onto the target's shard, from a file this rank slices its box
    of the memory map; either way the region is read in (faulted into the page cache, errors
    raised) and waits in ``writes`` until `commit`, after every rank agreed. Values that are
    transformed are computed into buffers of their own.
    """

    def __init__(self, model: torch.nn.Module, plan: LoadPlan, src: Source, source: Any) -> None:
        from ..checkpoint import Checkpoint

        self.plan, self.src, self.source = plan, src, source
        opened = isinstance(source, Checkpoint)
        self.dcp_folder: Path | None = Path(source.path) if opened and source.format == "dcp" else None
        self.dcp_reader: DcpReader | None = source.reader if self.dcp_folder is not None else None
        self.from_file = opened and self.dcp_folder is None
        self.state = model.state_dict(keep_vars=True)
        self.steps = plan.loaded
        self.boxes = {s.target: _box(s.target, self.state[s.target]) for s in self.steps}
        # a step is direct when its source tensor is the target's value as stored (a cast at most)
        self.direct = {s.target for s in self.steps
                       if len(s.sources) == 1 and all(isinstance(o, Cast) for o in s.ops)}
        self.currents: dict[str, torch.Tensor] = {}
        self.dcp_state: dict[str, torch.Tensor] = {}
        self.into_model: set[str] = set()  # DCP keys planned straight onto their target
        self.deferred: list[tuple[str, torch.Tensor, torch.Tensor, Callable[[], None]]] = []  # DCP's reads
        self.writes: list[tuple[torch.Tensor, torch.Tensor]] = []  # (target, region read in) for `commit`
        self.releases: list[Callable[[], None]] = []
        self.dcp_error: BaseException | None = None
        if self.dcp_folder is not None:
            self.dcp_state = self._dcp_targets()

    def _dcp_targets(self) -> dict[str, torch.Tensor]:
        """What ``dcp.load`` plans reads into: the target itself for a direct value, else a whole buffer."""
        from ..io._dtypes import to_torch

        uses: dict[str, int] = {}
        for s in self.steps:
            for key in s.sources:
                uses[key] = uses.get(key, 0) + 1
        out: dict[str, torch.Tensor] = {}
        for s in self.steps:
            for key in s.sources:
                if s.target in self.direct and uses[key] == 1:
                    out[key] = self.state[s.target].detach()  # DCP plans its shard; nothing is written yet
                    self.into_model.add(key)
                else:
                    shape, dtype = self.src.specs[key]
                    out[key] = torch.empty(shape, dtype=to_torch(dtype))
        return out

    def read_collective(self) -> None:
        """The reads every rank makes together: ``dcp.load``, and whole current values for adapters."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

        for s in self.steps:
            if s.adapted:
                current = self.state[s.target]
                self.currents[s.target] = current.full_tensor() if is_dtensor(current) else current
        if self.dcp_state:
            try:
                reader = WeightsmithDcpReader(str(self.dcp_folder), reader=self.dcp_reader, deferred=self.deferred)
                with warnings.catch_warnings():  # one process, no group: DCP says so, and that is the intent
                    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
                    dcp.load(self.dcp_state, storage_reader=reader,
                             planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=not initialized())
            except BaseException as e:  # CheckpointException (a BaseException) arrives on every rank
                self.dcp_error = e

    def stage(self) -> dict[str, torch.Tensor]:
        """This rank's part of every loaded value, read and checked; nothing of the model is written."""
        from ..io._base import read_in

        if self.dcp_error is not None:
            raise _unwrap(self.dcp_error, self.dcp_folder)
        src = self.src
        private = self.dcp_folder is not None  # dcp.load read into buffers of our own: no copy needed
        if private:
            for key, target, region, _ in self.deferred:
                if key in self.into_model:
                    self.writes.append((target, region))
                else:  # a buffer of our own, read for a transform
                    target.copy_(region)
            state = self.dcp_state
            src = replace(src, get=lambda key: state[key])
        staged = {}
        for s in self.steps:
            if s.sources[0] in self.into_model:
                continue  # DCP planned its reads onto the target's own shard; they wait in `writes`
            target, box = self.state[s.target], self.boxes[s.target]
            local = target.to_local() if is_dtensor(target) else target
            defer = False
            try:
                if s.target in self.direct:
                    value = src.get(s.sources[0])
                    if is_dtensor(value):  # checked sources laid out like the target
                        value = value.to_local()
                    elif box is not None:
                        value = value[box]
                    # a file's tensors never share the model's memory: read in now, copied at commit
                    defer = self.from_file
                else:
                    value = value_of(s, src, self.currents.get(s.target, target))
                    value = value if box is None else value[box]
                if defer:
                    read_in(value, f"{src.name}: {s.sources[0]!r}")
                elif not private:  # the caller's tensors, which may be the model's own: copy them
                    value = value.clone(memory_format=torch.contiguous_format)
            except (OSError, RuntimeError, ValueError, IndexError) as e:
                raise PlanError(f"cannot read {', '.join(s.sources)} from {src.name} for {s.target}: {e}; "
                                "nothing was changed") from e
            if value.shape != local.shape:
                raise PlanError(f"{s.target}: this rank's part of {', '.join(s.sources)} has shape "
                                f"{list(value.shape)}, its shard {list(local.shape)}; nothing was changed")
            if defer:
                self.writes.append((local, value))
                self.releases.append(functools.partial(self.source.release, s.sources[0]))
            else:
                staged[s.target] = value
        return staged

    def commit(self, staged: Mapping[str, torch.Tensor]) -> None:
        """Write every staged value and every deferred read into the model; every rank agreed."""
        targets = [self.state[name] for name in staged] + [target for target, _ in self.writes]
        with write_mode(targets):  # inference tensors take writes only under inference_mode
            for name, value in staged.items():
                target = self.state[name]
                (target.to_local() if is_dtensor(target) else target).copy_(value)
            for target, region in self.writes:
                target.copy_(region)

    def close(self) -> None:
        """Unmap the regions read for this load."""
        for *_, release in self.deferred:
            release()
        for release in self.releases:
            release()
        self.deferred.clear()
        self.releases.clear()
        self.writes.clear()

def _box(name: str, t: torch.Tensor) -> tuple[slice, ...] | None:
    """The region of the global tensor this rank holds (``None``: all of it)."""
    if not is_dtensor(t):
        return None
    from torch.distributed.tensor import Partial
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(isinstance(p, Partial) for p in t.placements):
        raise PlanError(f"{name}: a DTensor with Partial placements {t.placements} holds no slice of its value; "
                        "redistribute it to Shard or Replicate first")
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(shape) != tuple(t.to_local().shape):
        raise PlanError(f"{name}: its local shard {list(t.to_local().shape)} is not one block of the global "
                        f"tensor (placements {t.placements}); weightsmith loads Shard and Replicate layouts")
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))

def _prepare(model: torch.nn.Module, source: Any, plan: LoadPlan | None, options: dict[str, Any], *,
             strict: bool, min_coverage: float, tied: str | Sequence[str] = "error") -> _Work:
    from ..checkpoint import Checkpoint

    source, p, src, state = checked(model, source, plan, options, strict=strict, min_coverage=min_coverage, tied=tied,
                                     on_meta="materialize the sharded model (to_empty) before loading into it")
    inits = [s.target for s in p.unsourced if (s.fill or "").startswith("init: ") and is_dtensor(state[s.target])]
    if inits:
        raise UsageError(f"init rules for sharded parameters ({', '.join(inits[:5])}) are not applied while "
                         "loading; load with strict=False, then initialize them with weightsmith.init_")
    if isinstance(source, torch.nn.Module):
        _check_sharded_sources(p, source.state_dict(), state)
    elif isinstance(source, Mapping) and not isinstance(source, Checkpoint):
        _check_sharded_sources(p, source, state)
    return _Work(model, p, src, source)

def _check_sharded_sources(p: LoadPlan, values: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """A source that is itself sharded must be laid out like the targets it feeds, untransformed.

    Anything else would need collectives while staging, where one rank's failure would leave
    the others waiting; such sources are saved as a DCP folder and loaded from it.
    """
    sharded = {k for k, v in values.items() if is_dtensor(v)}  # items(): no value is read twice
    bad = []
    for s in p.loaded:
        target = state[s.target]
        for key in s.sources:
            if key not in sharded:
                continue
            value = values[key]
            same = (is_dtensor(target) and value.device_mesh == target.device_mesh
                    and value.placements == target.placements and value.shape == target.shape)
            if not same or len(s.sources) > 1 or any(not isinstance(o, Cast) for o in s.ops):
                bad.append(f"{key} -> {s.target}")
    if bad:
        raise UsageError(f"{len(bad)} source DTensor(s) are laid out unlike their targets or need a transform "
                         f"({', '.join(bad[:5])}); save the source with format='dcp' and load from that folder")

def _unwrap(error: BaseException, folder: Path | None) -> WeightsmithError:
    """A weightsmith error for a failed ``dcp.load``: this rank's own, else one naming the ranks."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict):
        mine = failures.get(rank_in())
        if mine is not None and isinstance(mine[0], WeightsmithError):
            return mine[0]
        return CheckpointError(f"{folder}: reading the DCP checkpoint failed ({describe(error)}); nothing was "
                               "changed on any rank")
    if isinstance(error, WeightsmithError):
        return error
    return CheckpointError(f"{folder}: reading the DCP checkpoint failed ({describe(error)}); nothing was changed")


def load_dcp_in_place(model: Any, p: LoadPlan, src: Source, source: Any, *, seed: int | None) -> LoadReport:
    """A DCP folder into plain torch modules, with no second copy of the model.

    A tensor saved by several ranks is in several chunks; assembling each before writing
    would hold the whole model twice. Instead ``dcp.load`` plans each chunk's region onto its
    target, the regions are read in and checked (nothing written), and only then copied in,
    as a sharded load does on each rank.
    """
    work = _Work(model, p, src, source)
    try:
        work.read_collective()
        staged = work.stage()
        state = model.state_dict(keep_vars=True)
        with uninterrupted(), write_mode(state[k] for k in written_keys(p)):
            fill_missing(model, p, seed=seed)  # init_ checks every rule before it writes
            work.commit(staged)
    finally:
        work.close()
    return report_of(p)
