"""`save_dcp`: write a ``torch.distributed.checkpoint`` folder atomically, on one rank or many."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter

from ..errors import SaveError
from ..save_report import SaveReport
from .agree import agree, broadcast, describe, initialized, raise_agreed, rank_in

__all__ = ["save_dcp"]


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
    raise_agreed(error, agree(error, process_group), f"saving {path}", kind=SaveError, outcome="nothing was written")
    assert state is not None  # no rank failed
    previous: list[Path] = []  # the swapped-out folder, deleted by all ranks together
    stack, stage = _open_stage(path, process_group, previous=None if async_save else previous)
    _uncache(path, process_group)
    writer = FileSystemWriter(stage, single_file_per_rank=True, sync_files=True)
    options = {"storage_writer": writer, "process_group": process_group, "no_dist": not initialized()}
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
        if rank_in(process_group) == 0:
            _close(stack, path, [(0, describe(failure))])
        raise SaveError(f"{path}: the asynchronous DCP save could not start ({describe(failure)})") from failure
    failures = agree(failure, process_group)
    names = _names(stage)
    error = None
    old: tuple[Path, list[str]] | None = None
    if rank_in(process_group) == 0:
        error = _close(stack, path, failures)
        old = (previous[0], _names(previous[0])) if previous else None
    message, old = broadcast((None if error is None else str(error), old), process_group)
    if old is not None:
        _discard(*old, process_group)
    if message is not None:
        raise (error if error is not None else SaveError(message)) from failure
    return _save_report(path, state, names)

def _open_stage(path: Path, group: Any, *, previous: list[Path] | None = None) -> tuple[contextlib.ExitStack, Path]:
    """The staging folder beside ``path``, named and created by rank 0, held open by its stack.

    ``previous``: as for `atomic_folder` (rank 0's list receives the swapped-out folder).
    """
    from ..io.atomic import atomic_folder

    stack = contextlib.ExitStack()  # on rank 0, exiting it swaps the folder into place
    stage, error = None, None
    if rank_in(group) == 0:
        try:
            stage = stack.enter_context(atomic_folder(path, previous=previous, uncache=False,  # see _uncache
                                                      keep=_not_dcp_own))
        except Exception as e:  # the other ranks wait for the name: send the error instead
            error = e
    stage, message = broadcast((stage, None if error is None else str(error)), group)
    if message is not None:
        raise error if error is not None else SaveError(message)
    return stack, stage

def _not_dcp_own(name: str) -> bool:
    """Whether a file in a DCP folder is someone else's (kept by a save), not DCP's own data or metadata."""
    return not (name.endswith(".distcp") or name.endswith(".metadata") or name.endswith(".metadata.tmp"))

def _my_share(names: list[str], group: Any) -> list[str]:
    """This rank's share of a list every rank holds in the same order (all of it without a group)."""
    return names[rank_in(group)::dist.get_world_size(group)] if initialized() else names

def _uncache(path: Path, group: Any) -> None:
    """Evict the current version's cached pages (see `atomic.evict`), each rank a share of the files."""
    from ..io.atomic import evict

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
    if initialized():
        dist.barrier(group=group)
    if rank_in(group) == 0:
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
    rank = rank_in(group)

    def done(inner: Any) -> None:
        # no collectives here: this runs on DCP's writer thread; rank 0's future completes only
        # after every rank's data and the metadata are written, so it may swap alone
        failure = inner.exception()
        names = _names(stage)
        error = _close(stack, path, [(rank, describe(failure))] if failure else []) if rank == 0 else None
        if failure is not None:
            outer.set_exception(SaveError(f"{path}: the asynchronous DCP save failed ({describe(failure)}); "
                                          "the previous folder is intact"))
        elif error is not None:
            outer.set_exception(error)
        else:
            outer.set_result(_save_report(path, state, names))

    future.add_done_callback(done)
    return outer

def _state_of(obj: Any) -> Mapping[str, Any]:
    from ..checkpoint import Checkpoint

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
