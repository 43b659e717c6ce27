"""Hugging Face sharded folders: an index JSON naming, per tensor, the shard file holding it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ._base import Reader, TensorInfo
from ._detect import INDEX_NAMES, detect
from .hub import in_cache_blobs

__all__ = ["ShardedReader", "confine", "INDEX_NAMES"]


def confine(folder: Path, name: str, *, what: str) -> Path:
    """``folder / name``, refusing names that lead out of ``folder`` (``..``, absolute, symlinks).

    A link from a Hugging Face cache snapshot to its repository's ``blobs`` is how the cache
    stores every file, and is followed."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CorruptCheckpointError(f"{what}: shard name {name!r} is not a file name")
    parts = Path(name).parts
    if Path(name).is_absolute() or os.path.isabs(name) or ".." in parts or "\\" in name or ":" in name:
        raise CorruptCheckpointError(f"{what}: shard path {name!r} leads out of {folder}; refusing it")
    real_folder = folder.resolve()
    target = (folder / name).resolve()
    if real_folder != target and real_folder not in target.parents and not in_cache_blobs(folder, target):
        raise CorruptCheckpointError(
            f"{what}: shard {name!r} resolves to {target}, outside {real_folder} (symlink?); refusing it")
    return folder / name


class ShardedReader(Reader):
    """A folder of shards with a Hugging Face index; each shard opens lazily by its own reader."""

    def __init__(self, index_path: Path) -> None:
        folder = index_path.parent
        super().__init__(path=folder, format="sharded")
        self.index_path = index_path
        weight_map, meta = _read_index(index_path)
        self.metadata = {k: str(v) for k, v in meta.items()}
        self._shards: dict[str, Reader] = {}
        owner: dict[str, str] = {}
        aliases: dict[str, str] = {}  # tied keys stored once, kept out of the index as usual
        for shard_name in dict.fromkeys(weight_map.values()):
            path = confine(folder, shard_name, what=str(index_path))
            if not path.is_file():
                raise CheckpointNotFoundError(
                    f"{index_path}: shard {shard_name!r} named in the index is missing from {folder}")
            reader = _shard_reader(path, index_path=index_path, shard_name=shard_name)
            self._shards[shard_name] = reader
            shard_aliases = reader.aliases()
            aliases.update({alias: shard_name for alias in shard_aliases})
            for key in reader.infos:
                if key in shard_aliases:
                    continue
                if key in owner:
                    raise CorruptCheckpointError(
                        f"{folder}: tensor {key!r} is stored in two shards, {owner[key]!r} and {shard_name!r}")
                owner[key] = shard_name
        for key, shard_name in weight_map.items():
            if owner.get(key) != shard_name:
                where = f"in {owner[key]!r}" if key in owner else "in no shard"
                raise CorruptCheckpointError(
                    f"{index_path}: the index puts {key!r} in {shard_name!r}, but it is {where}")
        stray = [k for k in owner if k not in weight_map]
        if stray:
            raise CorruptCheckpointError(
                f"{index_path}: {len(stray)} tensor(s) in shards are missing from the index, e.g. {stray[0]!r} "
                f"in {owner[stray[0]]!r}")
        owner.update(aliases)
        self._owner = owner
        infos: dict[str, TensorInfo] = {}
        for key in [*weight_map, *aliases]:
            info = self._shards[owner[key]].infos[key]
            infos[key] = TensorInfo(key, info.shape, info.dtype, info.nbytes,
                                    storage=None if info.storage is None else f"{owner[key]}:{info.storage}",
                                    file=owner[key])
        self.infos = infos

    @property
    def shards(self) -> dict[str, Reader]:
        """Shard file name -> its reader."""
        return dict(self._shards)

    def tensor(self, key: str) -> Any:
        return self._shards[self._owner[key]].tensor(key)

    def release(self, key: str) -> None:
        self._shards[self._owner[key]].release(key)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


def _shard_reader(path: Path, *, index_path: Path, shard_name: str) -> Reader:
    """The reader of one shard: a safetensors or torch.save file, never another index or folder
    (an index naming an index, itself or a cycle, would loop)."""
    kind, _ = detect(path)
    if kind == "safetensors":
        from .safetensors import SafetensorsReader

        return SafetensorsReader(path)
    if kind == "torch":
        from .torchfile import TorchFileReader

        return TorchFileReader(path)
    raise CorruptCheckpointError(
        f"{index_path}: shard {shard_name!r} is a {kind} checkpoint, not a file of tensors; "
        "a shard must be a safetensors or torch.save file")


def _read_index(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{path}: the index is not valid JSON ({e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(f"{path}: the index has no 'weight_map' object")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CorruptCheckpointError(f"{path}: 'weight_map' must map tensor names to shard file names")
    meta = index.get("metadata") or {}
    return weight_map, meta if isinstance(meta, dict) else {}
