"""safetensors files: header parsing with every rule of the format checked, mapped tensors."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, CorruptCheckpointError
from ._base import Reader, TensorInfo, check_bytes, map_file, release_pages, tensor_from_buffer
from ._dtypes import NAME_TO_SAFETENSORS, SAFETENSORS_TO_NAME, from_safetensors, nbytes_of, unrepresentable

__all__ = ["SafetensorsReader", "read_header", "MAX_HEADER", "TIES_KEY", "CHECKSUMS_KEY"]

MAX_HEADER = 100_000_000
TIES_KEY = "weightsmith.ties"  # metadata: JSON {alias: stored key}
CHECKSUMS_KEY = "weightsmith.crc32"  # metadata: JSON {key: crc32 of its bytes}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {k!r}")
        seen[k] = v
    return seen


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, tuple[int, int]], dict[str, str], int]:
    """Parse and validate a safetensors header.

    Returns:
        (infos, data_offsets by key, metadata, start of the data buffer in the file).

    Raises:
        CorruptCheckpointError: naming the file and the rule broken.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(f"{path}: {size} bytes is too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise CorruptCheckpointError(
                f"{path}: header declares {n:,} bytes, over the {MAX_HEADER:,}-byte limit")
        if 8 + n > size:
            raise CorruptCheckpointError(
                f"{path}: header declares {n:,} bytes but the file has only {size - 8:,} after the length"
                " (truncated?)")
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: header is not valid UTF-8 JSON ({e})") from e
    except RecursionError as e:  # the parser recurses per level: 10**5 nested brackets exhaust it
        raise CorruptCheckpointError(f"{path}: header JSON is nested too deeply to be a safetensors header") from e
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CorruptCheckpointError(f"{path}: __metadata__ must map strings to strings")
    infos: dict[str, TensorInfo] = {}
    offsets: dict[str, tuple[int, int]] = {}
    for key, entry in header.items():
        infos[key], offsets[key] = _entry(path, key, entry)
    buffer_len = size - 8 - n
    _check_layout(path, offsets, buffer_len)
    return infos, offsets, metadata, 8 + n


def _entry(path: Path, key: str, entry: Any) -> tuple[TensorInfo, tuple[int, int]]:
    if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"} or len(entry) != 3:
        raise CorruptCheckpointError(f"{path}: entry {key!r} must have exactly dtype, shape, data_offsets")
    code, shape, span = entry["dtype"], entry["shape"], entry["data_offsets"]
    dtype = SAFETENSORS_TO_NAME.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise CorruptCheckpointError(f"{path}: tensor {key!r} has unknown dtype {code!r}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise CorruptCheckpointError(f"{path}: tensor {key!r} has invalid shape {shape!r}")
    if not (isinstance(span, list) and len(span) == 2 and all(type(o) is int and o >= 0 for o in span)
            and span[0] <= span[1]):
        raise CorruptCheckpointError(f"{path}: tensor {key!r} has invalid data_offsets {span!r}")
    numel = 1
    for d in shape:
        numel *= d
        if numel > 1 << 62:
            raise CorruptCheckpointError(f"{path}: tensor {key!r} shape {shape} overflows")
    expected = nbytes_of(dtype, numel)
    if span[1] - span[0] != expected:
        raise CorruptCheckpointError(
            f"{path}: tensor {key!r} {code}{shape} needs {expected:,} bytes but data_offsets "
            f"{span} span {span[1] - span[0]:,}")
    # the shape torch gives the values: F4 [4, 6] is float4_e2m1fn_x2 [4, 3], two values a byte
    dtype, torch_shape = from_safetensors(code, tuple(shape)) or (dtype, tuple(shape))
    return TensorInfo(key, torch_shape, dtype, expected), (span[0], span[1])


def _check_layout(path: Path, offsets: dict[str, tuple[int, int]], buffer_len: int) -> None:
    end = 0
    for key, (begin, stop) in sorted(offsets.items(), key=lambda kv: kv[1]):
        if begin != end:
            what = "overlaps the previous tensor" if begin < end else f"leaves a gap of {begin - end} bytes"
            raise CorruptCheckpointError(f"{path}: tensor {key!r} at {begin} {what} (expected {end})")
        end = stop
    if end != buffer_len:
        problem = "truncated" if end > buffer_len else f"{buffer_len - end:,} trailing bytes"
        raise CorruptCheckpointError(
            f"{path}: tensors need {end:,} data bytes, the file holds {buffer_len:,} ({problem})")


class SafetensorsReader(Reader):
    """A safetensors file; tensors are memory-mapped copy-on-write."""

    def __init__(self, path: Path) -> None:
        super().__init__(path=path, format="safetensors")
        infos, self._offsets, self.metadata, self._start = read_header(path)
        self._aliases = _parse_ties(path, self.metadata, infos)
        for alias, stored in self._aliases.items():
            base = infos[stored]
            infos[alias] = TensorInfo(alias, base.shape, base.dtype, base.nbytes, storage=stored)
            infos[stored] = TensorInfo(stored, base.shape, base.dtype, base.nbytes, storage=stored)
        self.infos = infos
        self._map: Any = None

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def tensor(self, key: str) -> Any:
        name, key = key, self._aliases.get(key, key)
        info = self.infos[key]
        why = unrepresentable(info.dtype)
        if why is not None:
            code = NAME_TO_SAFETENSORS.get(info.dtype, info.dtype)
            raise CheckpointError(
                f"{self.path}: tensor {key!r} is {code} of shape {list(info.shape)}, which weightsmith cannot "
                f"represent as a torch tensor ({why}); leave it out with a key filter, or convert it with a "
                "tool that reads that dtype")
        if self._map is None:
            self._map = map_file(self.path)
        begin, end = self._offsets[key]
        check_bytes(self._map, self.path, self.stamp, name, self._start + begin, self._start + end)
        flat = tensor_from_buffer(self._map, self._start + begin, info.nbytes, info.dtype)
        return flat.reshape(info.shape)

    def data_span(self, key: str) -> tuple[int, int]:
        """Where ``key``'s bytes lie in the file, ``(offset, nbytes)``: always one row-major run."""
        begin, end = self._offsets[self._aliases.get(key, key)]
        return self._start + begin, end - begin

    def release(self, key: str) -> None:
        if self._map is not None:
            key = self._aliases.get(key, key)
            release_pages(self._map, self._start + self._offsets[key][0], self.infos[key].nbytes)

    def close(self) -> None:
        self._map = None


def _parse_ties(path: Path, metadata: dict[str, str], infos: dict[str, TensorInfo]) -> dict[str, str]:
    text = metadata.get(TIES_KEY)
    if not text:
        return {}
    try:
        ties = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{path}: metadata {TIES_KEY!r} is not JSON ({e})") from e
    if not isinstance(ties, dict):
        raise CorruptCheckpointError(f"{path}: metadata {TIES_KEY!r} must be a JSON object")
    for alias, stored in ties.items():
        if not isinstance(stored, str) or stored not in infos or alias in infos:
            raise CorruptCheckpointError(
                f"{path}: tie {alias!r} -> {stored!r} in metadata does not fit the stored tensors")
    return ties


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """Whether the first bytes look like a safetensors header (length + '{')."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= size - 8 and head[8:9] == b"{"



def tensor_bytes(key: str, tensor: Any) -> Any:
    """A zero-copy byte view of a tensor's data on the CPU (copying only if it must).

    What the writer (`io.writers.safetensors`) writes and what ``check --verify`` checksums.
    """
    import torch

    from ..errors import SaveError

    t = tensor.detach()
    if t.device.type == "meta":
        raise SaveError(f"tensor {key!r} is on the meta device and has no data to save")
    if t.layout != torch.strided:
        raise SaveError(f"tensor {key!r} has layout {t.layout}; only dense tensors can be saved")
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy()
