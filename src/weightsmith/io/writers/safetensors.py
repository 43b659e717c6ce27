"""safetensors out: the layout written onto an open file, and a whole file written atomically.

Every file carries ``"format": "pt"`` in its metadata (transformers 4.x refuses a safetensors
file whose metadata lacks it), the ties (alias -> stored key) and, unless turned off, a CRC-32
per tensor. ``float4_e2m1fn_x2`` is stored as ``F4``: torch's element is a byte holding two
values, so the header's last dimension is twice torch's.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import SaveError
from .. import safetensors as st_format
from ..safetensors import CHECKSUMS_KEY, TIES_KEY
from ._entries import Entries, Progress

__all__ = ["write_safetensors", "write_safetensors_file", "file_metadata", "header_entry", "check_storable",
           "storable", "FORMAT_KEY"]

FORMAT_KEY = "format"  # what transformers 4.x checks: "pt" for torch tensors
_FLOAT4 = "float4_e2m1fn_x2"


def _crc32_function() -> Callable[..., int]:
    """zlib's CRC-32, from ISA-L when it is installed: the same value, about 8x faster (checksums
    would otherwise take longer than writing the bytes)."""
    try:
        from isal.isal_zlib import crc32 as fast
    except ImportError:
        from zlib import crc32

        return crc32
    return fast


crc32 = _crc32_function()


def file_metadata(metadata: dict[str, str], ties: dict[str, str]) -> dict[str, str]:
    """The string metadata a safetensors file gets: ``"format": "pt"``, the caller's keys, the ties."""
    given = metadata.get(FORMAT_KEY, "pt")
    if given != "pt":
        raise SaveError(f"metadata {FORMAT_KEY!r} is {given!r}, but weightsmith writes torch tensors, which readers "
                        "expect as 'pt'; drop that key or set it to 'pt'")
    meta = {FORMAT_KEY: "pt", **{k: v for k, v in metadata.items() if k != FORMAT_KEY}}
    if ties:
        meta[TIES_KEY] = json.dumps(ties, separators=(",", ":"))
    return meta


def storable(dtype: str) -> bool:
    """Whether a tensor of this dtype name can be written to safetensors."""
    from .._dtypes import NAME_TO_SAFETENSORS

    return dtype in NAME_TO_SAFETENSORS or dtype == _FLOAT4


def check_storable(path: Path, entries: Entries) -> None:
    """Raise once, naming ``path`` and every key whose tensor safetensors cannot hold."""
    problems: list[str] = []
    for key, t in entries.items:
        try:
            header_entry(key, t)
        except SaveError as e:
            problems.append(str(e))
    if problems:
        raise SaveError("\n  - ".join([f"{path}: cannot be written as safetensors ({len(problems)} tensor(s)); "
                                        "nothing was written:", *problems[:20]]))


def header_entry(key: str, t: Any) -> tuple[str, list[int]]:
    """The safetensors dtype code and shape of a tensor (or a meta spec of one)."""
    from .._dtypes import NAME_TO_SAFETENSORS, name_of

    name = name_of(t.dtype)
    shape = list(t.shape)
    if name == _FLOAT4:
        if not shape:
            raise SaveError(f"tensor {key!r} is a 0-d {t.dtype}: its byte holds two float4 values, which a "
                            "safetensors header can only give as a dimension; reshape it to (1,)")
        return "F4", [*shape[:-1], shape[-1] * 2]
    code = NAME_TO_SAFETENSORS.get(name)
    if code is None:
        raise SaveError(f"tensor {key!r} has dtype {t.dtype}, which safetensors cannot store; "
                        "save it as a torch file (.pt) instead")
    return code, shape


def write_safetensors(f: Any, entries: Entries, metadata: dict[str, str], *, checksums: bool = True,
                      progress: Progress | None = None) -> int:
    """Write ``entries`` to an open binary file in safetensors layout; returns the bytes written.

    ``metadata`` is written as given (see `file_metadata`). With ``checksums``, a CRC-32 of each
    tensor's bytes goes into the metadata under ``weightsmith.crc32``; it is computed while
    writing and patched into a fixed-width header. ``progress(done, total, key)`` counts this
    file's data bytes.
    """
    from concurrent.futures import ThreadPoolExecutor

    header: dict[str, Any] = {}
    offset = 0
    for key, t in entries.items:
        code, shape = header_entry(key, t)
        size = Entries.nbytes_of(t)
        header[key] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    meta = dict(metadata)
    crcs = {key: "00000000" for key, _ in entries.items}
    if checksums:
        meta[CHECKSUMS_KEY] = json.dumps(crcs, separators=(",", ":"))

    def render() -> bytes:
        body = json.dumps({"__metadata__": meta, **header} if meta else header, separators=(",", ":")).encode()
        return body + b" " * (-len(body) % 8)

    head = render()
    start = f.tell()
    f.write(struct.pack("<Q", len(head)))
    f.write(head)
    done = 0
    # the CRC runs on a second thread while the same bytes are written (both release the GIL)
    with ThreadPoolExecutor(max_workers=1) as pool:
        for key, spec in entries.items:
            t = entries.tensor(key, spec)
            data = st_format.tensor_bytes(key, t)  # looked up here: one byte view, shared with verify
            crc = pool.submit(crc32, data) if checksums else None
            f.write(memoryview(data))
            if crc is not None:
                crcs[key] = f"{crc.result() & 0xFFFFFFFF:08x}"
            done += data.nbytes
            del t, data, crc  # let a streamed tensor go before the next one is read
            if entries.written is not None:
                entries.written(key)
            if progress is not None:
                progress(done, offset, key)
    if checksums:
        meta[CHECKSUMS_KEY] = json.dumps(crcs, separators=(",", ":"))
        final = render()
        if len(final) != len(head):  # cannot happen: fixed-width hex keeps the header's size
            raise SaveError(f"{getattr(f, 'name', 'output')}: the header changed size while checksums were added")
        end = f.tell()
        f.seek(start + 8)
        f.write(final)
        f.seek(end)
    return 8 + len(head) + offset


def write_safetensors_file(path: Path, entries: Entries, metadata: dict[str, str], *, checksums: bool = True,
                           progress: Progress | None = None,
                           check: Callable[[Path], None] | None = None) -> list[Path]:
    """Write one safetensors file atomically; ``check(written)`` may refuse it before it replaces ``path``."""
    from ..atomic import atomic_file

    meta = file_metadata(metadata, entries.ties)
    check_storable(path, entries)
    with atomic_file(path, direct=True) as f:
        write_safetensors(f, entries, meta, checksums=checksums, progress=progress)
        if check is not None:
            f.flush()
            check(Path(f.name))
    return [path]
