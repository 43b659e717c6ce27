"""Scale out: ``torch.distributed.checkpoint`` folders and models sharded across ranks.

- `save_dcp` writes a DCP folder atomically (staged beside the target, swapped in once
  every rank has written), with or without a process group; ``weightsmith.save(...,
  format="dcp")`` routes here.
- `WeightsmithDcpReader` is a ``FileSystemReader`` for ``dcp.load`` that reads ``.metadata``
  and every chunk with weightsmith's restricted readers: nothing from the folder is unpickled.
- `load_sharded_` loads any checkpoint into a model whose parameters are ``DTensor`` shards
  (``distribute_tensor``, FSDP2 ``fully_shard``), all or nothing across ranks: every rank makes
  the same plan from names and global shapes, reads only its own part (into the page cache,
  checked, held as regions of the file's map), and nothing is written anywhere until every
  rank has read and checked its part. ``weightsmith.load_`` routes here.

Every function here is collective when a process group is initialized: every rank calls it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan as DcpLoadPlan, LoadPlanner
from torch.futures import Future as TorchFuture

from .errors import CheckpointError, SaveError, UsageError, WeightsmithError
from .io.dcp import Chunk, DcpReader, copy_chunk, map_chunk, read_object
from .assign import _uninterrupted, _write_mode
from .errors import PlanError
from .warmstart.execute import LoadReport, checked, fill_missing, report_of, value_of
from .warmstart.plan import LoadPlan, Source
from .warmstart.transforms import Cast
from .save import SaveReport

__all__ = ["save_dcp", "load_sharded_", "is_sharded", "WeightsmithDcpReader"]


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is a ``DTensor``.

    >>> is_sharded(torch.nn.Linear(2, 2))
    False
    """
    return any(_is_dtensor(t) for t in (*model.parameters(), *model.buffers()))


def _is_dtensor(t: Any) -> bool:
    return any(cls.__name__ == "DTensor" for cls in type(t).__mro__)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


# -- agreeing across ranks ----------------------------------------------------------------------
def _agree(error: BaseException | None, group: Any = None) -> list[tuple[int, str]]:
    """Every rank's failure, ``(rank, message)``; empty when all succeeded. Collective.

    One ``all_reduce`` of a success flag in the common case; the messages are gathered only
    when some rank failed.
    """
    if not _distributed():
        return [] if error is None else [(0, _describe(error))]
    flag = torch.tensor([0 if error is not None else 1], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    if int(flag.item()) == 1:
        return []
    messages: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, None if error is None else _describe(error), group=group)
    return [(rank, m) for rank, m in enumerate(messages) if m is not None]


def _describe(error: BaseException) -> str:
    """One line per failure; DCP's ``CheckpointException`` is opened up into its ranks' errors."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        return "; ".join(f"rank {rank}: {_describe(exc)}" for rank, (exc, _trace) in sorted(failures.items()))
    return f"{type(error).__name__}: {error}"


def _raise_agreed(error: BaseException | None, failures: list[tuple[int, str]], what: str, *,
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


def _broadcast(value: Any, group: Any = None) -> Any:
    """Rank 0's ``value`` on every rank (as is without a process group)."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, group=group, group_src=0)
    return box[0]


def _rank(group: Any = None) -> int:
    return dist.get_rank(group) if _distributed() else 0


# -- reading ------------------------------------------------------------------------------------
class WeightsmithDcpReader(FileSystemReader):
    """A ``FileSystemReader`` that never unpickles anything from the checkpoint folder.

    ``.metadata`` is walked by weightsmith's restricted unpickler and DCP's ``Metadata`` is
    built from the plain values read (a pickle that would call code is refused); each tensor
    chunk is read by weightsmith's ``torch.save`` reader over its byte range and checked
    against the metadata; non-tensor entries are read as plain values only (numbers, strings,
    lists, dicts) and handed to the planner re-serialized from those values. Damaged files
    raise `CorruptCheckpointError` naming the file and the key.

    >>> import torch.distributed.checkpoint as dcp                     # doctest: +SKIP
    >>> dcp.load(model.state_dict(), storage_reader=WeightsmithDcpReader("ckpt/"))  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, _extension_registry: Any = None, *,
                 reader: DcpReader | None = None) -> None:
        """Read the DCP folder at ``path``; ``reader``: its metadata as already read by `weightsmith.open`."""
        super().__init__(path, _extension_registry)
        self._reader = reader
        # weightsmith's own sharded loads set this: each read then maps its region (read in,
        # checked) and appends (key, target, region, release) here instead of writing the target
        self._deferred: list[tuple[str, torch.Tensor, torch.Tensor, Callable[[], None]]] | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"{self.path}: per-rank metadata files (use_collectives=False) are not "
                                  "read by weightsmith; save with the default collectives")
        return _metadata_of(self._reader or DcpReader(Path(self.path)), load_id=self.load_id)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self._dtypes: dict[str, str] = {}
        self._sizes: dict[tuple[str, tuple[int, ...]], tuple[int, ...]] = {}
        for key, entry in metadata.state_dict_metadata.items():
            if isinstance(entry, TensorStorageMetadata):
                self._dtypes[key] = str(entry.properties.dtype).removeprefix("torch.")
                for c in entry.chunks:
                    self._sizes[(key, tuple(c.offsets))] = tuple(c.sizes)

    def read_data(self, plan: DcpLoadPlan, planner: LoadPlanner) -> TorchFuture[None]:
        folder = Path(self.path)
        items = sorted(plan.items, key=lambda r: (self.storage_data[r.storage_index].relative_path,
                                                  self.storage_data[r.storage_index].offset))
        for req in items:
            info = self.storage_data[req.storage_index]
            key = req.storage_index.fqn
            offsets = tuple(req.storage_index.offset or ())
            chunk = Chunk(offsets, self._sizes.get((key, offsets), ()), info.relative_path, info.offset,
                          info.length, tuple(getattr(info, "transform_descriptors", None) or ()))
            if req.type == LoadItemType.BYTE_IO:
                # the planner unpickles what it is given: give it our own bytes of plain values
                buf = io.BytesIO()
                torch.save(read_object(folder, key, chunk), buf)
                buf.seek(0)
                planner.load_bytes(req, buf)
                continue
            target = planner.resolve_tensor(req).detach()
            if tuple(target.shape) != tuple(req.lengths):
                raise CheckpointError(f"{folder}: {key!r}: the load plan puts {list(req.lengths)} elements "
                                      f"into a buffer of {list(target.shape)}")
            start = tuple(req.storage_offsets)
            if self._deferred is None:
                copy_chunk(folder, key, chunk, self._dtypes[key], target, start=start)
            else:
                region, chunk_reader = map_chunk(folder, key, chunk, self._dtypes[key], tuple(target.shape),
                                                 start=start)
                self._deferred.append((key, target, region, functools.partial(chunk_reader.release, "")))
            planner.commit_tensor(req, target)
        done: TorchFuture[None] = TorchFuture()
        done.set_result(None)
        return done


def _metadata_of(reader: DcpReader, *, load_id: str) -> Metadata:
    """DCP's ``Metadata``, built from what the restricted reader read (plain values only)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from .io._dtypes import to_torch

    entries: dict[str, Any] = {}
    storage: dict[MetadataIndex, Any] = {}
    for key, chunks in reader.layout.items():
        info = reader.infos[key]
        entries[key] = TensorStorageMetadata(
            TensorProperties(dtype=to_torch(info.dtype)), torch.Size(info.shape),
            [ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in chunks])
        for i, c in enumerate(chunks):
            if c.file is not None:
                storage[MetadataIndex(key, c.offsets, i)] = _StorageInfo(
                    c.file, c.byte_offset, c.length, list(c.transforms) or None)
    for key, c in reader.objects.items():
        entries[key] = BytesStorageMetadata()
        if c.file is not None:
            storage[MetadataIndex(key)] = _StorageInfo(c.file, c.byte_offset, c.length, list(c.transforms) or None)
    planner_data = None if reader.planner_data is None else dict(reader.planner_data)
    return Metadata(entries, planner_data=planner_data, storage_data=storage,
                    storage_meta=StorageMeta(load_id=load_id), version=reader.version)


# -- saving -------------------------------------------------------------------------------------
def save_dcp(obj: Any, path: str | Path, *, async_save: bool = False,
             process_group: Any = None) -> SaveReport | Future[SaveReport]:
    """Save a model, a state dict or an open checkpoint as a ``torch.distributed.checkpoint`` folder.

    With a process group every rank calls it and writes its own shards (``DTensor`` and FSDP2
    state is handled by DCP); without one a single process writes everything. The folder is
    written beside ``path`` under a temporary name chosen by rank 0, with
    ``FileSystemWriter(single_file_per_rank=True, sync_files=True)``; once every rank has
    written and ``.metadata`` is in place, rank 0 swaps it into ``path``. A crash leaves the
    previous folder at ``path`` intact (the ranks must share the filesystem, as DCP requires).
    Files in the folder other than DCP's own (``.metadata``, ``*.distcp``) are kept as they were.

    Args:
        obj: an ``nn.Module`` (its state through ``get_model_state_dict``), a mapping of key ->
            tensor or plain value (numbers, strings, lists, dicts), or a `Checkpoint` (mapped
            tensor by tensor where its format allows, so a safetensors file streams).
        path: the folder to write.
        async_save: write through ``dcp.async_save`` and return a future instead of waiting;
            the folder appears at ``path`` when rank 0's future completes.
        process_group: the group of ranks saving (default: the default group, if initialized).

    Returns:
        a `SaveReport`, or with ``async_save`` a ``concurrent.futures.Future`` of one.

    >>> import weightsmith                                                  # doctest: +SKIP
    >>> weightsmith.save(model, "ckpt/step-100", format="dcp")             # doctest: +SKIP
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    state, error = None, None
    try:
        state = _state_of(obj)
        _check_saveable(state, path)
    except Exception as e:  # any failure on one rank must reach the others, or they wait forever
        error = e
    _raise_agreed(error, _agree(error, process_group), f"saving {path}", kind=SaveError, outcome="nothing was written")
    assert state is not None  # no rank failed
    previous: list[Path] = []  # the swapped-out folder, deleted by all ranks together
    stack, stage = _open_stage(path, process_group, previous=None if async_save else previous)
    _uncache(path, process_group)
    writer = FileSystemWriter(stage, single_file_per_rank=True, sync_files=True)
    options = {"storage_writer": writer, "process_group": process_group, "no_dist": not _distributed()}
    failure: BaseException | None = None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            if async_save:
                return _finish_async(dcp.async_save(state, **options), stack, path, stage, state, process_group)
            dcp.save(state, **options)
        except BaseException as e:  # DCP raises CheckpointException, a BaseException, on every rank
            failure = e
    if async_save:  # failed before anything was queued: no collective follows, each rank reports
        if _rank(process_group) == 0:
            _close(stack, path, [(0, _describe(failure))])
        raise SaveError(f"{path}: the asynchronous DCP save could not start ({_describe(failure)})") from failure
    failures = _agree(failure, process_group)
    names = _names(stage)
    error = None
    old: tuple[Path, list[str]] | None = None
    if _rank(process_group) == 0:
        error = _close(stack, path, failures)
        old = (previous[0], _names(previous[0])) if previous else None
    message, old = _broadcast((None if error is None else str(error), old), process_group)
    if old is not None:
        _discard(*old, process_group)
    if message is not None:
        raise (error if error is not None else SaveError(message)) from failure
    return _save_report(path, state, names)


def _open_stage(path: Path, group: Any, *, previous: list[Path] | None = None) -> tuple[contextlib.ExitStack, Path]:
    """The staging folder beside ``path``, named and created by rank 0, held open by its stack.

    ``previous``: as for `atomic_folder` (rank 0's list receives the swapped-out folder).
    """
    from .io.atomic import atomic_folder

    stack = contextlib.ExitStack()  # on rank 0, exiting it swaps the folder into place
    stage, error = None, None
    if _rank(group) == 0:
        try:
            stage = stack.enter_context(atomic_folder(path, previous=previous, uncache=False,  # see _uncache
                                                      keep=_not_dcp_own))
        except Exception as e:  # the other ranks wait for the name: send the error instead
            error = e
    stage, message = _broadcast((stage, None if error is None else str(error)), group)
    if message is not None:
        raise error if error is not None else SaveError(message)
    return stack, stage


def _not_dcp_own(name: str) -> bool:
    """Whether a file in a DCP folder is someone else's (kept by a save), not DCP's own data or metadata."""
    return not (name.endswith(".distcp") or name.endswith(".metadata") or name.endswith(".metadata.tmp"))


def _my_share(names: list[str], group: Any) -> list[str]:
    """This rank's share of a list every rank holds in the same order (all of it without a group)."""
    return names[_rank(group)::dist.get_world_size(group)] if _distributed() else names


def _uncache(path: Path, group: Any) -> None:
    """Evict the current version's cached pages (see `atomic.evict`), each rank a share of the files."""
    from .io.atomic import evict

    try:
        names = sorted(p.name for p in path.iterdir() if p.is_file())
    except OSError:
        return
    evict(path / name for name in _my_share(names, group))


def _discard(old: Path, names: list[str], group: Any) -> None:
    """Delete the swapped-out previous folder, its files shared among the ranks.

    Unlinking a large file costs about as much as writing a tenth of it; one rank deleting
    every rank's files would add that, serially, to the save.
    """
    import shutil

    for name in _my_share(names, group):
        with contextlib.suppress(OSError):
            (old / name).unlink()
    if _distributed():
        dist.barrier(group=group)
    if _rank(group) == 0:
        shutil.rmtree(old, ignore_errors=True)


def _names(stage: Path) -> list[str]:
    """The files DCP wrote into the staging folder (listed before rank 0 moves it)."""
    try:
        return sorted(p.name for p in stage.iterdir())
    except OSError:
        return []


def _close(stack: contextlib.ExitStack, path: Path, failures: list[tuple[int, str]]) -> SaveError | None:
    """Swap the staged folder into place, or drop it when a rank failed; the error, if any."""
    if failures:
        lines = "; ".join(dict.fromkeys(m for _, m in failures))  # DCP reports its failures on every rank
        error = SaveError(f"{path}: the DCP save failed ({lines}); the previous folder is intact")
        with contextlib.suppress(BaseException):
            stack.__exit__(SaveError, error, None)
        return error
    try:
        stack.close()
    except Exception as e:  # the other ranks wait for rank 0's word: never leave without one
        return e if isinstance(e, SaveError) else SaveError(f"{path}: could not be put in place ({e})")
    return None


def _finish_async(upload: Any, stack: contextlib.ExitStack, path: Path, stage: Path, state: Mapping[str, Any],
                  group: Any) -> Future[SaveReport]:
    future = getattr(upload, "upload_completion", upload)  # an AsyncSaveResponse, or the future
    outer: Future[SaveReport] = Future()
    rank = _rank(group)

    def done(inner: Any) -> None:
        # no collectives here: this runs on DCP's writer thread; rank 0's future completes only
        # after every rank's data and the metadata are written, so it may swap alone
        failure = inner.exception()
        names = _names(stage)
        error = _close(stack, path, [(rank, _describe(failure))] if failure else []) if rank == 0 else None
        if failure is not None:
            outer.set_exception(SaveError(f"{path}: the asynchronous DCP save failed ({_describe(failure)}); "
                                          "the previous folder is intact"))
        elif error is not None:
            outer.set_exception(error)
        else:
            outer.set_result(_save_report(path, state, names))

    future.add_done_callback(done)
    return outer


def _state_of(obj: Any) -> Mapping[str, Any]:
    from .checkpoint import Checkpoint

    if isinstance(obj, torch.nn.Module):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(obj)
    if isinstance(obj, Checkpoint):
        return obj.load()  # memory-mapped where the format allows: DCP writes them one by one
    if isinstance(obj, Mapping):
        return obj
    raise SaveError(f"cannot save a {type(obj).__name__}: give an nn.Module, a mapping or an opened checkpoint")


_PLAIN = (type(None), bool, int, float, str)


def _check_saveable(state: Mapping[str, Any], path: Path) -> None:
    problems: list[str] = []

    def walk(key: str, value: Any, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_meta:
                problems.append(f"{key}: a meta tensor holds no data")
        elif isinstance(value, Mapping) and depth < 32:
            for k, v in value.items():
                if isinstance(k, str):
                    walk(f"{key}.{k}", v, depth + 1)
                else:
                    problems.append(f"{key}: key {k!r} is not a string")
        elif isinstance(value, (list, tuple)) and depth < 32:
            for i, v in enumerate(value):
                walk(f"{key}.{i}", v, depth + 1)
        elif not isinstance(value, _PLAIN):
            problems.append(f"{key}: a {type(value).__name__} (loading it back would need its class; save "
                            "plain values)")

    for key, value in state.items():
        if not isinstance(key, str):
            problems.append(f"key {key!r} is not a string")
        else:
            walk(key, value, 0)
    if path.exists() and not path.is_dir():
        problems.append(f"{path} exists and is not a folder")
    if problems:
        raise SaveError("\n  - ".join([f"{path}: cannot save as DCP ({len(problems)} problem(s)):", *problems[:20]]))


def _save_report(path: Path, state: Mapping[str, Any], names: list[str]) -> SaveReport:
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    return SaveReport(str(path), "dcp", [str(path / n) for n in names], len(tensors),
                      sum(t.numel() * t.element_size() for t in tensors))


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
    if not _distributed():
        raise UsageError("load_sharded_ needs an initialized process group (torch.distributed.init_process_group); "
                         "for a model in one process use weightsmith.load_")
    error: BaseException | None = None
    work: _Work | None = None
    try:
        work = _prepare(model, source, plan, dict(plan_options), strict=strict, min_coverage=min_coverage,
                        tied=tied)
    except Exception as e:  # any failure on one rank must reach the others, or they wait forever
        error = e
    _raise_agreed(error, _agree(error), "planning the load")
    assert work is not None  # no rank failed
    try:
        work.read_collective()  # every rank, same order: DCP reads, whole values for adapters
        staged: dict[str, torch.Tensor] = {}
        try:
            staged = work.stage()
        except Exception as e:
            error = e
        _raise_agreed(error, _agree(error), "staging the load")
        with _uninterrupted():  # Ctrl-C waits until this rank's shards are whole
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
        from .checkpoint import Checkpoint

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
        from .io._dtypes import to_torch

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
                self.currents[s.target] = current.full_tensor() if _is_dtensor(current) else current
        if self.dcp_state:
            try:
                reader = WeightsmithDcpReader(str(self.dcp_folder), reader=self.dcp_reader)
                reader._deferred = self.deferred
                with warnings.catch_warnings():  # one process, no group: DCP says so, and that is the intent
                    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
                    dcp.load(self.dcp_state, storage_reader=reader,
                             planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=not _distributed())
            except BaseException as e:  # CheckpointException (a BaseException) arrives on every rank
                self.dcp_error = e

    def stage(self) -> dict[str, torch.Tensor]:
        """This rank's part of every loaded value, read and checked; nothing of the model is written."""
        from .io._base import read_in

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
            local = target.to_local() if _is_dtensor(target) else target
            defer = False
            try:
                if s.target in self.direct:
                    value = src.get(s.sources[0])
                    if _is_dtensor(value):  # checked sources laid out like the target
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
        with _write_mode(targets):  # inference tensors take writes only under inference_mode
            for name, value in staged.items():
                target = self.state[name]
                (target.to_local() if _is_dtensor(target) else target).copy_(value)
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
    if not _is_dtensor(t):
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
    from .checkpoint import Checkpoint

    source, p, src, state = checked(model, source, plan, options, strict=strict, min_coverage=min_coverage, tied=tied,
                                     on_meta="materialize the sharded model (to_empty) before loading into it")
    inits = [s.target for s in p.unsourced if (s.fill or "").startswith("init: ") and _is_dtensor(state[s.target])]
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
    sharded = {k for k, v in values.items() if _is_dtensor(v)}  # items(): no value is read twice
    bad = []
    for s in p.loaded:
        target = state[s.target]
        for key in s.sources:
            if key not in sharded:
                continue
            value = values[key]
            same = (_is_dtensor(target) and value.device_mesh == target.device_mesh
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
        mine = failures.get(_rank())
        if mine is not None and isinstance(mine[0], WeightsmithError):
            return mine[0]
        return CheckpointError(f"{folder}: reading the DCP checkpoint failed ({_describe(error)}); nothing was "
                               "changed on any rank")
    if isinstance(error, WeightsmithError):
        return error
    return CheckpointError(f"{folder}: reading the DCP checkpoint failed ({_describe(error)}); nothing was changed")

