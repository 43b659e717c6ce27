"""`convert`: any checkpoint weightsmith reads, rewritten as safetensors or a torch file.

Safetensors output (one file, or a Hugging Face sharded folder) is streamed: the header is
written from shapes and dtypes alone, then each tensor is read from the memory-mapped source,
cast if asked, written, and its pages released, so peak memory stays near the largest tensor.
The output appears complete or not at all, and ``verify=True`` checks it before it does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ._result import Result
from .errors import CheckpointError, SaveError, UsageError, WeightsmithError
from .selectors import Selector, select as select_names

__all__ = ["convert", "ConvertReport", "CONVERTED_FROM_KEY"]

Progress = Callable[[int, int, str], None]
CONVERTED_FROM_KEY = "weightsmith.converted_from"  # metadata: the source's file name (no machine path)
_DTYPES = {"float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
           "float32": torch.float32, "float": torch.float32, "float64": torch.float64}


@dataclass
class ConvertReport(Result):
    """What `convert` wrote.

    Attributes:
        source: the checkpoint read; ``source_format`` its format.
        path: what was written; ``format`` is ``safetensors``, ``sharded``, ``torch`` or ``dcp``.
        files: every file written (shards and index for a sharded folder).
        tensors: keys written, tied keys included.
        nbytes: bytes of tensor data written (tied tensors once).
        ties: tied key -> the key whose data it shares.
        dtype: the dtype floating tensors were cast to, or ``None``.
        cast: how many stored tensors were cast.
        metadata: the string metadata written (safetensors).
        verified: whether the output was read back and matched the source.
        notes: anything dropped on the way.
    """

    SCHEMA: ClassVar[str] = "weightsmith.convert/1"

    source: str
    source_format: str
    path: str
    format: str
    files: list[str]
    tensors: int
    nbytes: int
    ties: dict[str, str] = field(default_factory=dict)
    dtype: str | None = None
    cast: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    verified: bool = False
    notes: list[str] = field(default_factory=list)

    def _rich_(self) -> str:
        from .listing import human_bytes

        text = (f"converted {self.tensors} tensors ({human_bytes(self.nbytes)}) from {self.source_format} "
                f"{self.source} to {self.format} {self.path}")
        if self.format == "sharded":
            text += f" ({len(self.files) - 1} shards)"
        if self.ties:
            text += f"; {len(self.ties)} tied key(s) stored once"
        if self.dtype:
            text += f"; {self.cast} floating tensor(s) cast to {self.dtype}"
        if self.verified:
            text += "; verified: every tensor matches the source"
        return "\n".join([text, *(f"note: {n}" for n in self.notes)])


def convert(
    src: str | os.PathLike[str] | Any,
    dst: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str | None = None,
    select: Selector | None = None,
    format: str | None = None,  # noqa: A002 - the same option as `save`
    verify: bool = False,
    progress: Progress | None = None,
    root: str | None = None,
    trust: bool = False,
    strip_prefix: str | Sequence[str] = (),
    rename: Mapping[str, str] | Sequence[str] = (),
    rules: str | os.PathLike[str] | None = None,
) -> ConvertReport:
    """Rewrite a checkpoint as safetensors (one file or sharded) or as a torch file, atomically.

    Safetensors output is streamed tensor by tensor from the memory-mapped source, each
    tensor's pages released once written, so peak memory is about the largest tensor (twice
    that when it is cast). A torch file cannot be streamed: ``torch.save`` takes the whole
    dict, so it is given the memory-mapped source tensors (no copy without a cast, but every
    page read stays resident until the save ends; with a cast, all cast tensors are held).
    Ties are kept (stored once, recorded); metadata of a safetensors or sharded source is
    carried over, with ``weightsmith.converted_from`` (the source's file name) added and
    ``"format": "pt"`` set. A sharded output replaces only the previous checkpoint's index and
    shards in an existing folder; its other files (config, tokenizer, README) are kept.

    Args:
        src: a path (anything `weightsmith.open` reads) or an opened `Checkpoint`. Pages of
            a source opened here are released as it goes; an opened one's are left alone.
        dst: the file, or the folder for sharded output. Replaced atomically if it exists.
        dtype: cast floating-point tensors to this (``"float16"``, ``"bfloat16"``,
            ``"float32"`` or a ``torch.dtype``); other tensors keep theirs.
        max_shard_size: write a sharded folder with shards of at most this size (``"5GB"``).
        select: a selector on the source keys; only those are written.
        format: ``"safetensors"``, ``"sharded"``, ``"torch"`` or ``"dcp"`` (a
            torch.distributed.checkpoint folder, written by `weightsmith.distributed.save_dcp`; no
            ``verify``); by default from ``dst``'s suffix (``.pt``/``.pth``/``.bin``/``.ckpt`` ->
            torch) and ``max_shard_size``.
        verify: read the output back before it replaces ``dst`` and compare every tensor with
            the source, bit for bit (after the same cast).
        progress: called as ``progress(done_bytes, total_bytes, key)``.
        root, trust: passed to `weightsmith.open` when ``src`` is a path.
        strip_prefix: drop this prefix (or each of these) from the keys that have it (``"module."``).
        rename: renames applied after the prefixes, each a glob with ``{captures}``, as a mapping
            ``{"encoder.layer.{i}": "blocks.{i}"}`` or strings ``"SRC=DST"``; the first that fits a key
            renames it. ``select`` then picks among the new names.
        rules: a rename-rule file (.toml or .json), as `weightsmith.plan` takes it. A prefix, rename or
            rule that matches no key, or two keys landing on one name, is a `UsageError` naming each.

    Returns:
        a `ConvertReport`.

    Raises:
        UsageError: bad options, all listed at once.
        SaveError: the output could not be written, or did not verify; ``dst`` is untouched.

    >>> import weightsmith                                                    # doctest: +SKIP
    >>> weightsmith.convert("model.pt", "model.safetensors", dtype="bfloat16", verify=True)  # doctest: +SKIP
    """
    dst = Path(dst)
    problems: list[str] = []
    target = _target_dtype(dtype, problems)
    fmt, limit = _output(dst, format, max_shard_size, problems)
    if fmt == "dcp" and verify:
        problems.append("verify is not available for DCP output; compare afterwards with weightsmith.diff")
    ckpt, owned = _source(src, root, trust, problems)
    try:
        if strip_prefix or rename or rules:
            from .renaming import key_map, renamed

            prefixes = (strip_prefix,) if isinstance(strip_prefix, str) else tuple(strip_prefix)
            renames = [f"{a}={b}" for a, b in rename.items()] if isinstance(rename, Mapping) else list(rename)
            ckpt = renamed(ckpt, key_map(list(ckpt), prefixes=prefixes, renames=renames,
                                         rules=os.fspath(rules) if rules is not None else None))
        keys = list(ckpt) if select is None else select_names(ckpt, select)
        stored, ties = _dedupe(ckpt, keys)
        out_dtype = {k: _cast_to(ckpt[k].dtype, target) for k in stored}
        if fmt in {"safetensors", "sharded"}:
            from .io.writers.safetensors import storable

            bad = [f"{k!r} ({out_dtype[k]})" for k in stored if not storable(out_dtype[k])]
            if bad:
                raise UsageError(f"safetensors cannot store the dtype of {', '.join(bad[:10])}; "
                                 "convert to a torch file (.pt) instead")
        job = _Job(ckpt, owned, dst, keys, stored, ties, out_dtype, target, progress)
        meta = _metadata(ckpt)
        if fmt == "torch":
            report = _write_torch(job, verify)
        elif fmt == "dcp":
            report = _write_dcp(job)
        elif fmt == "sharded":
            report = _write_sharded(job, meta, limit or 0, verify)
        else:
            report = _write_single(job, meta, verify)
    finally:
        if owned:
            ckpt.close()
    return report


# ---------------------------------------------------------------- options


def _target_dtype(dtype: Any, problems: list[str]) -> torch.dtype | None:
    if dtype is None:
        return None
    value = _DTYPES.get(dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        problems.append(f"dtype must be a floating-point dtype (float16, bfloat16, float32), got {dtype!r}")
        return None
    return value


def _output(dst: Path, format: str | None, max_shard_size: Any, problems: list[str]) -> tuple[str, int | None]:
    from .saving import format_for, parse_size

    fmt = "safetensors"
    try:
        fmt = "dcp" if format == "dcp" else format_for(dst, format, max_shard_size)
    except SaveError as e:
        problems.append(str(e))
    limit = None
    if max_shard_size is not None:
        try:
            limit = parse_size(max_shard_size)
        except SaveError as e:
            problems.append(str(e))
        if fmt != "sharded":
            problems.append(f"max_shard_size writes a sharded folder, not a {fmt} file")
    elif fmt == "sharded":
        problems.append(f"{dst}: a sharded folder needs max_shard_size (e.g. '5GB')")
    if not dst.parent.is_dir():
        problems.append(f"{dst}: the folder {dst.parent} does not exist")
    elif fmt in {"sharded", "dcp"} and dst.exists() and not dst.is_dir():
        problems.append(f"{dst} is a file; a {fmt} checkpoint is a folder")
    elif fmt not in {"sharded", "dcp"} and dst.is_dir():
        problems.append(f"{dst} is a folder; give a file name, or max_shard_size for a sharded folder")
    return fmt, limit


def _source(src: Any, root: str | None, trust: bool, problems: list[str]) -> tuple[Any, bool]:
    from .checkpoint import Checkpoint, open as open_checkpoint

    error: Exception | None = None
    ckpt, owned = None, False
    if isinstance(src, Checkpoint):
        ckpt = src
    elif isinstance(src, (str, os.PathLike)):
        try:
            ckpt, owned = open_checkpoint(Path(src), root=root, trust=trust), True
        except CheckpointError as e:
            error = e
    else:
        problems.append(f"cannot convert a {type(src).__name__}: give a checkpoint path or an opened Checkpoint")
    if problems:
        if owned:
            ckpt.close()
        raise UsageError("cannot convert: " + "; ".join([*problems, *([str(error)] if error else [])]))
    if error is not None:
        raise error
    return ckpt, owned


def _dedupe(ckpt: Any, keys: list[str]) -> tuple[list[str], dict[str, str]]:
    """The keys to store (each tied group once, under its first selected key) and the ties."""
    first: dict[str, str] = {}
    stored: list[str] = []
    ties: dict[str, str] = {}
    for key in keys:
        storage = ckpt[key].storage
        if storage is not None and storage in first:
            ties[key] = first[storage]
            continue
        if storage is not None:
            first[storage] = key
        stored.append(key)
    return stored, ties


def _cast_to(dtype: str, target: torch.dtype | None) -> str:
    from .io._dtypes import to_torch

    if target is None:
        return dtype
    try:
        floating = to_torch(dtype).is_floating_point
    except WeightsmithError:  # a dtype this torch lacks: left as it is
        return dtype
    return str(target).removeprefix("torch.") if floating else dtype


def _metadata(ckpt: Any) -> dict[str, str]:
    """The source's string metadata, less what is rewritten (format, ties, checksums, sizes).

    The source is named by its file name only: a path would record the machine it ran on.
    """
    from .io.safetensors import CHECKSUMS_KEY, TIES_KEY
    from .io.writers.safetensors import FORMAT_KEY

    rewritten = {TIES_KEY, CHECKSUMS_KEY, FORMAT_KEY, "total_size"}
    meta = {k: v for k, v in ckpt.metadata.items() if k not in rewritten}
    meta[CONVERTED_FROM_KEY] = Path(ckpt.path).name
    return meta


# ---------------------------------------------------------------- writing


@dataclass
class _Job:
    ckpt: Any
    owned: bool
    dst: Path
    keys: list[str]
    stored: list[str]
    ties: dict[str, str]
    out_dtype: dict[str, str]
    target: torch.dtype | None
    progress: Progress | None

    def nbytes(self, key: str) -> int:
        from .io._dtypes import nbytes_of

        return nbytes_of(self.out_dtype[key], self.ckpt[key].numel)

    @property
    def total(self) -> int:
        return sum(self.nbytes(k) for k in self.stored)

    def spec(self, key: str) -> torch.Tensor:
        """A meta tensor with the output's shape and dtype: what the header is written from."""
        from .io._dtypes import to_torch

        return torch.empty(self.ckpt[key].shape, dtype=to_torch(self.out_dtype[key]), device="meta")

    def tensor(self, key: str, _spec: Any = None) -> torch.Tensor:
        """The source tensor as it is written: cast floating tensors when asked."""
        t = self.ckpt.tensor(key)
        if self.target is not None and t.is_floating_point() and t.dtype != self.target:
            t = t.to(self.target)
        return t

    def release(self, key: str) -> None:
        if self.owned:
            self.ckpt.release(key)

    def entries(self) -> Any:
        """What the writers take: header specs, each tensor read (and cast) in its turn, then released."""
        from .io.writers import Entries

        return Entries([(k, self.spec(k)) for k in self.stored], dict(self.ties), materialize=self.tensor,
                       written=self.release)

    def report(self, fmt: str, files: list[Path], meta: dict[str, str], verified: bool,
               notes: list[str] | None = None) -> ConvertReport:
        cast = sum(self.out_dtype[k] != self.ckpt[k].dtype for k in self.stored)
        return ConvertReport(str(self.ckpt.path), self.ckpt.format, str(self.dst), fmt, [str(f) for f in files],
                             len(self.keys), self.total, dict(self.ties),
                             None if self.target is None else str(self.target).removeprefix("torch."),
                             cast, meta, verified, notes or [])


def _write_single(job: _Job, meta: dict[str, str], verify: bool) -> ConvertReport:
    from .io.writers import write_safetensors_file

    check = (lambda written: _verify(job, written, "safetensors")) if verify else None
    files = write_safetensors_file(job.dst, job.entries(), meta, progress=job.progress, check=check)
    return job.report("safetensors", files, meta, verify)


def _write_sharded(job: _Job, meta: dict[str, str], limit: int, verify: bool) -> ConvertReport:
    from .io.writers import write_sharded_folder

    check = (lambda stage: _verify(job, stage, "sharded")) if verify else None
    files = write_sharded_folder(job.dst, job.entries(), meta, limit=limit, progress=job.progress, check=check)
    return job.report("sharded", files, meta, verify)


def _write_torch(job: _Job, verify: bool) -> ConvertReport:
    from .io.writers import write_torch_file

    # torch.save takes the whole dict; tied keys share one tensor (written once), and views of
    # one source storage share it without a cast. Handed over without a name here, so the writer
    # lets it go before verifying.
    dropped = sorted(k for k in _metadata(job.ckpt) if k != CONVERTED_FROM_KEY)
    check = (lambda written: _verify(job, written, "torch")) if verify else None
    files = write_torch_file(job.dst, job.ckpt.load(job.keys, dtype=job.target), total=job.total,
                             progress=job.progress, check=check)
    notes = [f"torch files carry no string metadata; not kept: {', '.join(dropped)}"] if dropped else []
    return job.report("torch", files, {}, verify, notes)


def _write_dcp(job: _Job) -> ConvertReport:
    from .distributed.dcp_save import save_dcp

    dropped = sorted(k for k in _metadata(job.ckpt) if k != CONVERTED_FROM_KEY)
    saved = save_dcp(job.ckpt.load(job.keys, dtype=job.target), job.dst)
    assert not isinstance(saved, Future)  # a synchronous save
    notes = [f"DCP folders carry no string metadata; not kept: {', '.join(dropped)}"] if dropped else []
    return job.report("dcp", [Path(f) for f in saved.files], {}, False, notes)


# ---------------------------------------------------------------- verifying


def _verify(job: _Job, written: Path, fmt: str) -> None:
    """Read ``written`` back and compare it with the source, bit for bit; raise `SaveError` on
    any mismatch (the caller has not yet put the output in place)."""
    from .checkpoint import Checkpoint
    from .io.safetensors import SafetensorsReader
    from .io.sharded import INDEX_NAMES, ShardedReader
    from .io.torchfile import TorchFileReader

    # the reader is named rather than detected: a temporary file has no telling suffix
    if fmt == "safetensors":
        out = Checkpoint(SafetensorsReader(written))
    elif fmt == "torch":
        out = Checkpoint(TorchFileReader(written))
    else:
        out = Checkpoint(ShardedReader(written / INDEX_NAMES[0]))
    problems: list[str] = []
    try:
        missing = [k for k in job.keys if k not in out]
        wanted = set(job.keys)
        extra = [k for k in out if k not in wanted]
        if missing:
            problems.append(f"missing {', '.join(map(repr, missing[:5]))}")
        if extra:
            problems.append(f"unexpected {', '.join(map(repr, extra[:5]))}")
        for alias, key in job.ties.items():
            if alias in out and (out[alias].storage is None or out[alias].storage != out[key].storage):
                problems.append(f"tie {alias!r} -> {key!r} was not kept")
        for key in job.stored:
            if key in missing:
                continue
            want, got = job.tensor(key), out.tensor(key)
            if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
                problems.append(f"{key!r} is {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}")
            elif not _same_bits(got, want):
                problems.append(f"{key!r} holds different values")
            del want, got
            out.release(key)
            job.release(key)
    finally:
        out.close()
    if problems:
        raise SaveError(f"{job.dst}: verification failed, the output does not match the source: "
                        + "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
                        + ". Nothing was written; the previous file, if any, is intact")


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.numel() == 0:
        return True
    return bool(torch.equal(x.contiguous().reshape(-1).view(torch.uint8),
                            y.contiguous().reshape(-1).view(torch.uint8)))
