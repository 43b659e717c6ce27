"""Write tensors computed one at a time to a file, a sharded folder or a live model, atomically.

A `Stream` lists the output keys with shapes and dtypes (enough for a safetensors header) and
computes each tensor when its turn comes; the writers here call it in order, so at most one
output tensor is alive at a time for safetensors output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..errors import PlanError

__all__ = ["Stream", "write", "TORCH_SUFFIXES"]

Progress = Callable[[int, int, str], None]
TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


@dataclass
class Stream:
    """Output keys in order, each ``(key, shape, dtype name)``; ``produce(key)`` computes one.

    ``release()`` is called after each tensor is written (drop the input pages it read);
    ``ties`` maps alias -> stored key; ``metadata`` is stored with safetensors output.
    """

    entries: list[tuple[str, tuple[int, ...], str]]
    produce: Callable[[str], Any]
    release: Callable[[], None] = lambda: None
    ties: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    progress: Progress | None = None
    inputs: list[Path] = field(default_factory=list)
    done: int = 0  # bytes written so far
    streaming: bool = False  # set while a writer takes each tensor only until the next is asked for

    def nbytes(self, entry: tuple[str, tuple[int, ...], str]) -> int:
        from ..io._dtypes import nbytes_of

        n = 1
        for d in entry[1]:
            n *= d
        return nbytes_of(entry[2], n)

    @property
    def total(self) -> int:
        return sum(self.nbytes(e) for e in self.entries)


def write(stream: Stream, out: Any, *, max_shard_size: int | str | None = None) -> tuple[str, str, list[str]]:
    """Write ``stream`` to ``out``; returns (where, format, files).

    ``out`` is a path (safetensors; a torch file by suffix; a sharded folder with
    ``max_shard_size``), or an ``nn.Module`` loaded all or nothing (strict).
    """
    if hasattr(out, "state_dict") and hasattr(out, "named_parameters"):
        _into_model(stream, out)
        return type(out).__name__, "model", []
    path = Path(out)
    for src in stream.inputs:
        if _same_place(src, path):
            raise UsageError(f"{path}: is one of the inputs; write the output elsewhere (inputs are never modified)")
    if max_shard_size is not None:
        return str(path), "sharded", _write_sharded(stream, path, max_shard_size)
    if path.is_dir():
        raise UsageError(f"{path}: is a folder; give max_shard_size= to write a sharded folder, or a file name")
    if path.suffix in TORCH_SUFFIXES:
        from ..saving import save

        save(_state(stream), path, format="torch")
        return str(path), "torch", [str(path)]
    from ..io.writers import write_safetensors_file

    _streamed(stream, lambda entries: write_safetensors_file(path, entries, stream.metadata))
    return str(path), "safetensors", [str(path)]


def _same_place(a: Path, b: Path) -> bool:
    a, b = Path(a).resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def _streamed(stream: Stream, write: Callable[[Any], list[Path]]) -> list[Path]:
    """Run a writer of `io.writers` over ``stream``: each tensor computed when its turn comes."""
    import torch

    from ..io._dtypes import to_torch
    from ..io.writers import Entries

    sizes = {e[0]: stream.nbytes(e) for e in stream.entries}

    def materialize(key: str, _spec: Any) -> Any:
        stream.release()
        return stream.produce(key)

    def written(key: str) -> None:
        stream.done += sizes[key]
        if stream.progress is not None:
            stream.progress(stream.done, stream.total, key)

    specs = [(k, torch.empty(shape, dtype=to_torch(dt), device="meta")) for k, shape, dt in stream.entries]
    stream.streaming = True  # the writer lets each tensor go before asking for the next
    try:
        files = write(Entries(specs, dict(stream.ties), materialize=materialize, written=written))
    finally:
        stream.streaming = False
    stream.release()
    return files


def _write_sharded(stream: Stream, folder: Path, max_shard_size: int | str) -> list[str]:
    from ..io.writers import write_sharded_folder
    from ..saving import parse_size

    limit = parse_size(max_shard_size)
    files = _streamed(stream, lambda entries: write_sharded_folder(folder, entries, stream.metadata, limit=limit))
    return [str(f) for f in files]


def _state(stream: Stream) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for e in stream.entries:
        state[e[0]] = stream.produce(e[0])
        stream.release()
        stream.done += stream.nbytes(e)
        if stream.progress is not None:
            stream.progress(stream.done, stream.total, e[0])
    for alias, key in stream.ties.items():
        state[alias] = state[key]
    return state


def _into_model(stream: Stream, model: Any) -> None:
    from ..warmstart.load import load_

    state = _state(stream)
    try:
        load_(model, state, strict=True)
    except PlanError as e:
        raise PlanError(f"the output does not fit {type(model).__name__}; the model is unchanged: {e}",
                        problems=e.problems) from e
