"""`save`: a model or state dict to safetensors, a torch file or a sharded folder, atomically."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SaveError
from .save_report import SaveReport

if TYPE_CHECKING:
    from concurrent.futures import Future

    from .io.writers import Entries

__all__ = ["save", "SaveReport", "parse_size"]

Progress = Callable[[int, int, str], None]
_TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from ``5_000_000``, ``"5GB"``, ``"500MiB"``."""
    if isinstance(size, int):
        if size <= 0:
            raise SaveError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m:
        raise SaveError(f"cannot read size {size!r}: write it like 5GB, 500MB or 2GiB")
    return parse_size(int(float(m.group(1)) * _UNITS[m.group(2) or "B"]))


def save(obj: Any, path: str | Path, *, format: str | None = None, metadata: Mapping[str, str] | None = None,
         max_shard_size: int | str | None = None, checksums: bool = True,
         progress: Progress | None = None, async_save: bool = False) -> SaveReport | Future[SaveReport]:
    """Save a model, a state dict or an open checkpoint, atomically.

    Tied tensors (one tensor under several keys) are stored once and the tie is recorded,
    so loading restores it. A crash never leaves a half-written file at ``path``.

    Args:
        obj: an ``nn.Module`` (its ``state_dict()``), a mapping of key -> tensor, or a
            `Checkpoint` (streamed tensor by tensor).
        path: the file, or the folder for sharded output.
        format: ``"safetensors"`` (default), ``"torch"``, ``"sharded"``, or ``"dcp"`` (a
            torch.distributed.checkpoint folder; every rank calls save, see
            `weightsmith.distributed.save_dcp`); inferred from the suffix
            (``.pt``/``.pth``/``.bin``/``.ckpt`` -> torch) and from ``max_shard_size``.
        metadata: string metadata (safetensors only); every safetensors file also carries
            ``"format": "pt"``, which transformers 4.x requires.
        max_shard_size: write a Hugging Face sharded folder with shards of at most this size
            (``"5GB"``); the index is written last. Into an existing model folder, only the
            previous checkpoint's index and shards are replaced: ``config.json``, tokenizer files
            and everything else stay as they were.
        checksums: store a CRC-32 per tensor (safetensors), checked by ``check --verify``.
        progress: called as ``progress(done_bytes, total_bytes, key)``.
        async_save: with ``format="dcp"``, save through ``dcp.async_save`` and return a future.

    Returns:
        a `SaveReport` (with ``async_save``, a future of one).

    >>> import torch, weightsmith                                   # doctest: +SKIP
    >>> weightsmith.save(torch.nn.Linear(4, 8), "linear.safetensors")   # doctest: +SKIP
    """
    path = Path(path)
    if format == "dcp":
        from .distributed.dcp_save import save_dcp

        if metadata or max_shard_size is not None:
            raise SaveError(f"{path}: a DCP folder takes no metadata or max_shard_size")
        return save_dcp(obj, path, async_save=async_save)
    if async_save:
        raise SaveError(f"{path}: async_save needs format='dcp'")
    tensors = _tensors_of(obj)
    stored, ties = _dedupe(tensors)
    fmt = format_for(path, format, max_shard_size)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if fmt == "torch":
        if metadata:
            raise SaveError(f"{path}: torch files carry no string metadata; save as safetensors to keep it")
        return _save_torch(tensors, stored, ties, path, progress)
    if fmt == "sharded":
        if max_shard_size is None:
            raise SaveError(f"{path}: a sharded folder needs max_shard_size (e.g. '5GB')")
        return _save_sharded(stored, ties, path, meta, parse_size(max_shard_size), checksums, progress)
    return _save_single(stored, ties, path, meta, checksums, progress)


def _tensors_of(obj: Any) -> Mapping[str, Any]:
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if hasattr(obj, "reader") and hasattr(obj, "tensor"):  # a Checkpoint: load lazily
        return obj.load()
    if not isinstance(obj, Mapping):
        raise SaveError(f"cannot save a {type(obj).__name__}: give an nn.Module or a mapping of tensors")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)]
    if bad:
        raise SaveError(f"only string keys and tensors can be saved; offending keys: {', '.join(bad[:5])}")
    return obj


def _dedupe(tensors: Mapping[str, Any]) -> tuple[list[tuple[str, Any]], dict[str, str]]:
    """Stored entries (each shared tensor once) and the ties: alias key -> stored key."""
    first: dict[tuple[Any, ...], str] = {}
    stored: list[tuple[str, Any]] = []
    ties: dict[str, str] = {}
    for key, t in tensors.items():
        ident = None
        if t.device.type != "meta" and t.numel():
            ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                     tuple(t.stride()), t.dtype)
        if ident is not None and ident in first:
            ties[key] = first[ident]
            continue
        if ident is not None:
            first[ident] = key
        stored.append((key, t))
    return stored, ties


def format_for(path: Path, fmt: str | None, max_shard_size: Any) -> str:
    if fmt is None:
        if max_shard_size is not None:
            fmt = "sharded"
        elif path.suffix in _TORCH_SUFFIXES:
            fmt = "torch"
        else:
            fmt = "safetensors"
    if fmt not in {"safetensors", "torch", "sharded"}:
        raise SaveError(f"{path}: unknown format {fmt!r}; use safetensors, torch or sharded")
    return fmt


def _entries(stored: list[tuple[str, Any]], ties: dict[str, str]) -> Entries:
    from .io.writers import Entries

    return Entries(stored, ties)


def _save_single(stored: list[tuple[str, Any]], ties: dict[str, str], path: Path, meta: dict[str, str],
                 checksums: bool, progress: Progress | None) -> SaveReport:
    from .io.writers import write_safetensors_file

    entries = _entries(stored, ties)
    files = write_safetensors_file(path, entries, meta, checksums=checksums, progress=progress)
    return SaveReport(str(path), "safetensors", [str(f) for f in files], entries.count, entries.nbytes, ties)


def _save_torch(tensors: Mapping[str, Any], stored: list[tuple[str, Any]], ties: dict[str, str],
                path: Path, progress: Progress | None) -> SaveReport:
    from .io.writers import write_torch_file

    nbytes = _entries(stored, ties).nbytes
    files = write_torch_file(path, tensors, total=nbytes, progress=progress)
    return SaveReport(str(path), "torch", [str(f) for f in files], len(tensors), nbytes, ties)


def _save_sharded(stored: list[tuple[str, Any]], ties: dict[str, str], folder: Path, meta: dict[str, str],
                  limit: int, checksums: bool, progress: Progress | None) -> SaveReport:
    from .io.writers import write_sharded_folder

    entries = _entries(stored, ties)
    files = write_sharded_folder(folder, entries, meta, limit=limit, checksums=checksums, progress=progress)
    return SaveReport(str(folder), "sharded", [str(f) for f in files], entries.count, entries.nbytes, ties)
