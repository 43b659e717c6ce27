"""`open`: any checkpoint as a lazy, read-only mapping of key -> `TensorInfo`.

Listing keys, shapes and dtypes reads headers only; tensors are materialized on request,
memory-mapped where the format allows.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .io._base import Reader, TensorInfo

if TYPE_CHECKING:
    import torch

__all__ = ["open", "Checkpoint", "TensorInfo"]

Progress = Callable[[int, int, str], None]


def open(path: str | Path, *, root: str | None = None, trust: bool = False) -> Checkpoint:  # noqa: A001
    """Open a checkpoint lazily, whatever its format.

    Reads safetensors files, ``torch.save`` files (zip or legacy; ``.pt``, ``.pth``, ``.bin``,
    ``.ckpt``), Hugging Face model folders and sharded folders, and
    ``torch.distributed.checkpoint`` folders. The format is detected by content.

    Args:
        path: a file or a folder.
        root: for nested checkpoints (``{"state_dict": ...}``, Lightning, EMA copies), the
            ``/``-separated path of the dict to read; the default is chosen sensibly and the
            alternatives are in ``Checkpoint.roots``.
        trust: allow a torch file whose pickle calls code to be unpickled. Only for files
            you vouch for.

    Raises:
        CheckpointNotFoundError, UnknownFormatError, CorruptCheckpointError,
        UnsafeCheckpointError, RootError: with the file and what is wrong.

    >>> import weightsmith, torch                                # doctest: +SKIP
    >>> ckpt = weightsmith.open("model.safetensors")             # doctest: +SKIP
    >>> ckpt["0.weight"].shape                                   # doctest: +SKIP
    (8, 4)
    """
    from .io import reader_for

    return Checkpoint(reader_for(path, root=root, trust=trust))


class Checkpoint(Mapping[str, TensorInfo]):
    """A checkpoint opened by `open`: a read-only mapping of key -> `TensorInfo`."""

    def __init__(self, reader: Reader) -> None:
        self._reader = reader

    # mapping ------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> TensorInfo:
        try:
            return self._reader.infos[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in {self.path}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._reader.infos)

    def __len__(self) -> int:
        return len(self._reader.infos)

    def __repr__(self) -> str:
        return (f"<Checkpoint {self.format} {str(self.path)!r}: {len(self)} tensors, "
                f"{self.num_params:,} parameters>")

    # what the file says -------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The file or folder opened."""
        return self._reader.path

    @property
    def format(self) -> str:
        """``safetensors``, ``torch``, ``torch-legacy``, ``sharded`` or ``dcp``."""
        return self._reader.format

    @property
    def metadata(self) -> dict[str, str]:
        """String metadata stored with the tensors (safetensors ``__metadata__``, index metadata)."""
        return dict(self._reader.metadata)

    @property
    def root(self) -> str:
        """The ``/``-separated path of the state dict read inside a nested checkpoint (``""``: top)."""
        return self._reader.root

    @property
    def roots(self) -> tuple[str, ...]:
        """Every root that holds tensors, for ``open(path, root=...)``."""
        return self._reader.roots

    @property
    def other_objects(self) -> dict[str, str]:
        """Non-tensor objects in the file by path, listed by class name and never constructed."""
        return dict(self._reader.other_objects)

    @property
    def notes(self) -> list[str]:
        """Remarks about how the file was read (legacy format, trust, ...)."""
        return list(self._reader.notes)

    @property
    def reader(self) -> Reader:
        """The format reader (layout details such as DCP chunks or shard files)."""
        return self._reader

    @property
    def ties(self) -> list[tuple[str, ...]]:
        """Groups of keys whose data is one storage, as recorded by the file."""
        groups: dict[str, list[str]] = {}
        for key, info in self._reader.infos.items():
            if info.storage is not None:
                groups.setdefault(info.storage, []).append(key)
        return [tuple(g) for g in groups.values() if len(g) > 1]

    @property
    def num_params(self) -> int:
        """Elements over all tensors, each tied group counted once."""
        return sum(info.numel for info in self._unique())

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data, each tied group counted once."""
        return sum(info.nbytes for info in self._unique())

    def _unique(self) -> Iterator[TensorInfo]:
        seen: set[str] = set()
        for info in self._reader.infos.values():
            if info.storage is not None:
                if info.storage in seen:
                    continue
                seen.add(info.storage)
            yield info

    # tensors ------------------------------------------------------------------------------
    def tensor(self, key: str, *, device: Any = None, dtype: Any = None) -> torch.Tensor:
        """One tensor, memory-mapped when no device or dtype change is asked for.

        The file is checked first to be the one opened: cut short, rewritten in place or
        replaced since, it raises `CorruptCheckpointError` naming the file and key (reading a
        map past its file's end would kill the process). A mapped tensor already returned
        stays a view of the file: ``.clone()`` it if the file may change while you use it.
        """
        if key not in self._reader.infos:
            raise KeyError(f"{key!r} is not in {self.path}")
        t = self._reader.tensor(key)
        if device is not None or dtype is not None:
            t = t.to(device=device, dtype=dtype)
        return t

    def release(self, key: str) -> None:
        """Drop the memory-mapped pages of ``key``'s data, once done reading it.

        Streaming over a large checkpoint otherwise leaves every page read resident. Tensors
        over the pages stay valid (they are read back from the file on the next access), but
        changes written into tensors of this checkpoint revert to the file's bytes: call it only
        for tensors that were read and not modified.
        """
        if key not in self._reader.infos:
            raise KeyError(f"{key!r} is not in {self.path}")
        self._reader.release(key)

    def load(self, keys: Iterable[str] | None = None, *, device: Any = "cpu", dtype: Any = None,
             progress: Progress | None = None) -> dict[str, torch.Tensor]:
        """Materialize tensors as a state dict; tied keys share one tensor.

        Args:
            keys: the keys to load (default: all).
            device: where to put them; on ``"cpu"`` with no dtype change they stay memory-mapped.
            dtype: cast floating-point tensors to this dtype.
            progress: called as ``progress(done_bytes, total_bytes, key)``.

        Raises:
            CorruptCheckpointError: the file changed since it was opened (see `tensor`).
        """
        import torch

        wanted = builtins.list(self._reader.infos if keys is None else keys)
        missing = [k for k in wanted if k not in self._reader.infos]
        if missing:
            raise KeyError(f"{len(missing)} key(s) not in {self.path}, e.g. {missing[0]!r}")
        target = torch.device(device) if device is not None else None
        total = sum(self._reader.infos[k].nbytes for k in wanted)
        done = 0
        shared: dict[str, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for key in wanted:
            info = self._reader.infos[key]
            t = shared.get(info.storage) if info.storage is not None else None
            if t is None:
                t = self._reader.tensor(key)
                if t.is_meta and target is not None and target.type != "meta":
                    from .errors import CheckpointError

                    raise CheckpointError(f"{self.path}: tensor {key!r} is stored without data (a meta "
                                          "tensor); load it with device='meta', or leave it out of keys=")
                cast = dtype if dtype is not None and t.is_floating_point() else None
                if (target is not None and t.device != target) or (cast is not None and t.dtype != cast):
                    t = t.to(device=target, dtype=cast)
                if info.storage is not None:
                    shared[info.storage] = t
            out[key] = t
            done += info.nbytes
            if progress is not None:
                progress(done, total, key)
        return out

    def close(self) -> None:
        """Drop the file mapping (tensors already returned stay valid)."""
        self._reader.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

