"""``torch.distributed.checkpoint`` folders: the ``.metadata`` file, read with restricted unpickling."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from ._base import Reader, TensorInfo
from ._dtypes import nbytes_of
from ._pickle import Opaque, scan_pickle
from .sharded import confine
from .torchfile import unreadable, unsafe_message

__all__ = ["DcpReader", "Chunk", "METADATA_NAME"]

METADATA_NAME = ".metadata"
_MAX_METADATA = 1 << 30


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: where it sits in the global tensor and in which file."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str | None
    byte_offset: int | None
    length: int | None


def _state(obj: Any, kind: str, path: Path) -> Any:
    if not isinstance(obj, Opaque) or not obj._ws_global.endswith(kind):
        raise CorruptCheckpointError(f"{path}: expected a {kind} in .metadata, found {obj!r:.80}")
    return obj.ws_state


class DcpReader(Reader):
    """A DCP folder: global shapes, dtypes and the chunk layout, from ``.metadata`` alone."""

    def __init__(self, folder: Path) -> None:
        super().__init__(path=folder, format="dcp")
        meta_path = folder / METADATA_NAME
        size = meta_path.stat().st_size
        if size > _MAX_METADATA:
            raise CorruptCheckpointError(f"{meta_path}: {size:,} bytes is too large for checkpoint metadata")
        try:
            scan = scan_pickle(meta_path.read_bytes())
        except pickle.UnpicklingError as e:
            raise unreadable(meta_path, "the metadata", e) from e
        if scan.called:
            raise UnsafeCheckpointError(unsafe_message(meta_path, scan.called), globals=scan.called)
        try:
            self._parse(scan.objects[0], meta_path)
        except (AttributeError, TypeError, KeyError, ValueError, IndexError) as e:
            raise CorruptCheckpointError(f"{meta_path}: unexpected metadata layout ({e})") from e

    def _parse(self, top: Any, meta_path: Path) -> None:
        state = _state(top, "Metadata", meta_path)
        files: dict[tuple[str, tuple[int, ...]], tuple[str, int, int]] = {}
        for index, info in (state.get("storage_data") or {}).items():
            idx, where = index.ws_state, info.ws_state
            rel = str(where["relative_path"])
            confine(self.path, rel, what=str(meta_path))
            files[(idx["fqn"], tuple(idx.get("offset") or ()))] = (rel, int(where["offset"]), int(where["length"]))
        self.layout: dict[str, list[Chunk]] = {}
        infos: dict[str, TensorInfo] = {}
        for key, entry in state["state_dict_metadata"].items():
            if isinstance(entry, Opaque) and entry._ws_global.endswith("BytesStorageMetadata"):
                self.other_objects[key] = "bytes"
                continue
            body = _state(entry, "TensorStorageMetadata", meta_path)
            props = body["properties"].ws_state
            dtype = str(props[0] if isinstance(props, tuple) else props["dtype"]).removeprefix("torch.")
            shape = tuple(int(d) for d in body["size"])
            chunks = []
            for chunk in body["chunks"]:
                c = chunk.ws_state
                offsets = tuple(int(d) for d in c["offsets"])
                rel, off, length = files.get((key, offsets), (None, None, None))
                chunks.append(Chunk(offsets, tuple(int(d) for d in c["sizes"]), rel, off, length))
            self.layout[key] = chunks
            numel = 1
            for d in shape:
                numel *= d
            infos[key] = TensorInfo(key, shape, dtype, nbytes_of(dtype, numel),
                                    file=",".join(sorted({c.file for c in chunks if c.file})) or None)
        self.infos = infos
        self.notes.append(f"{len({c.file for v in self.layout.values() for c in v})} data file(s)")

    def tensor(self, key: str) -> Any:
        raise CheckpointError(
            f"{self.path}: reading tensor data from a torch.distributed.checkpoint folder is not "
            "supported yet; its keys, shapes and layout are available")
