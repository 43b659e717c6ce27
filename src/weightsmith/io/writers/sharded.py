"""Hugging Face sharded folders out: ``model-0000i-of-0000N.safetensors`` shards, then the index.

The folder is built beside its path and swapped in whole, so it holds the old checkpoint or the
new one, never a mixture. Only the previous checkpoint's own files are replaced: the index, the
shards it names, and files of the same pattern (``model.safetensors``, which transformers would
otherwise load ahead of the index). Everything else in a model folder (``config.json``,
tokenizer files, ``README.md``, subfolders) is kept as it was.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from ._entries import Entries, Progress
from .safetensors import check_storable, file_metadata, write_safetensors

__all__ = ["write_sharded_folder", "pack", "shard_names", "replaced_by_a_save", "INDEX_NAME"]

INDEX_NAME = "model.safetensors.index.json"
_OURS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def pack(entries: Entries, limit: int) -> list[list[str]]:
    """Keys in order, cut into shards of at most ``limit`` bytes (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in entries.items:
        n = Entries.nbytes_of(t)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def shard_names(count: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def replaced_by_a_save(folder: Path) -> Callable[[str], bool]:
    """Whether a file name in ``folder`` belongs to the checkpoint a sharded save replaces.

    Those are the index, the plain ``.safetensors`` file names its weight map gives, and names of
    the pattern Hugging Face writers use (``model.safetensors``, ``model-00001-of-00002.safetensors``).
    """
    try:
        index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        index = {}
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    values = weight_map.values() if isinstance(weight_map, dict) else []
    # only plain shard file names inside the folder: a hostile index cannot get other files deleted
    named = {v for v in values if isinstance(v, str) and v.endswith(".safetensors")
             and "/" not in v and "\\" not in v and not v.startswith(".")}
    return lambda name: name in named or _OURS.fullmatch(name) is not None


def write_sharded_folder(folder: Path, entries: Entries, metadata: dict[str, str], *, limit: int,
                         checksums: bool = True, progress: Progress | None = None,
                         check: Callable[[Path], None] | None = None) -> list[Path]:
    """Write a sharded folder atomically, keeping the folder's other files; returns the files written.

    ``check(staged_folder)`` may refuse the staged output before it replaces anything.
    """
    from ..atomic import atomic_folder, new_file

    file_metadata(metadata, {})  # refused metadata and dtypes fail here, before anything is written
    check_storable(folder, entries)
    shards = pack(entries, limit)
    names = shard_names(len(shards))
    total = entries.nbytes
    replaced = replaced_by_a_save(folder)
    done = 0
    with atomic_folder(folder, keep=lambda name: not replaced(name)) as stage:
        for name, keys in zip(names, shards):
            part = entries.only(keys)

            def step(d: int, _t: int, key: str, base: int = done) -> None:
                if progress is not None:
                    progress(base + d, total, key)

            with new_file(stage / name, direct=True) as f:
                write_safetensors(f, part, file_metadata(metadata, part.ties), checksums=checksums, progress=step)
            done += part.nbytes
        index = {"metadata": {"total_size": total, **metadata},
                 "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
        (stage / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        if check is not None:
            check(stage)
    return [folder / n for n in [*names, INDEX_NAME]]
