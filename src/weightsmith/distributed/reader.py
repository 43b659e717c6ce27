"""`WeightsmithDcpReader`: a DCP storage reader that reads with weightsmith's restricted readers."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
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

from ..errors import CheckpointError
from ..io.dcp import Chunk, DcpReader, copy_chunk, map_chunk, read_object

__all__ = ["WeightsmithDcpReader"]


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
                 reader: DcpReader | None = None,
                 deferred: list[tuple[str, torch.Tensor, torch.Tensor, Callable[[], None]]] | None = None) -> None:
        """Read the DCP folder at ``path``; ``reader``: its metadata as already read by `weightsmith.open`.

        ``deferred`` (weightsmith's own sharded loads): each read then maps its region (read in,
        checked) and appends ``(key, target, region, release)`` to it instead of writing the target.
        """
        super().__init__(path, _extension_registry)
        self._reader = reader
        self._deferred = deferred

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

    from ..io._dtypes import to_torch

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
