"""Hugging Face Hub sources: ``hf://ORG/NAME[@REVISION][/PATH]`` resolved to local weight files.

Only the weights are fetched, through ``huggingface_hub`` and its cache: a safetensors index and
its shards, or the one safetensors file, and torch files only where a folder has no safetensors.
What is fetched is then opened like a local file, so everything that opens a checkpoint takes a
Hub source. ``PATH`` names a subfolder (``text_encoder``) or a file; ``REVISION`` a branch, tag or
commit. With ``HF_HUB_OFFLINE=1`` (or no network) the cached copy is used.

>>> import weightsmith as ws                                            # doctest: +SKIP
>>> ws.open("hf://sentence-transformers/all-MiniLM-L6-v2@main")         # doctest: +SKIP
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, UnknownFormatError, UsageError

__all__ = ["HubRef", "is_hub", "parse", "resolve", "fetch", "pick", "in_cache_blobs"]

PREFIX = "hf://"
_SAFETENSORS_FIRST = ("model.safetensors.index.json", "model.safetensors")
_TORCH_FIRST = ("pytorch_model.bin.index.json", "pytorch_model.bin")
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_INSTALL = "pip install huggingface_hub"


@dataclass(frozen=True)
class HubRef:
    """A parsed ``hf://`` source: the repository, its revision (None: the default branch), a path in it."""

    repo: str
    revision: str | None = None
    path: str = ""

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{PREFIX}{self.repo}{rev}" + (f"/{self.path}" if self.path else "")


def is_hub(source: Any) -> bool:
    """Whether ``source`` names a Hub repository (``hf://...``; also as ``Path`` has folded it, ``hf:/...``)."""
    if not isinstance(source, (str, PurePath)):
        return False
    text = os.fspath(source)
    return text.startswith(PREFIX) or (text.startswith("hf:/") and not Path(text).exists())


def parse(source: str | PurePath) -> HubRef:
    """``hf://ORG/NAME[@REVISION][/PATH]`` -> `HubRef` (a ``refs/pr/N`` revision is taken whole)."""
    text = os.fspath(source)
    body = text[len(PREFIX):] if text.startswith(PREFIX) else text[len("hf:/"):]
    parts = body.split("/")
    revision = None
    if len(parts) >= 2 and "@" in parts[1]:
        parts[1], revision = parts[1].split("@", 1)
        if revision == "refs" and len(parts) >= 4 and parts[2] == "pr":  # refs/pr/N holds slashes
            revision = "/".join(["refs", *parts[2:4]])
            del parts[2:4]
    if len(parts) < 2 or not all(_NAME.fullmatch(p) for p in parts[:2]) or revision == "" or "" in parts[2:]:
        raise UsageError(f"{text}: not a Hub source; write hf://ORG/NAME, hf://ORG/NAME@REVISION or "
                         "hf://ORG/NAME[@REVISION]/SUBFOLDER (e.g. hf://openai-community/gpt2@main)")
    return HubRef("/".join(parts[:2]), revision, "/".join(parts[2:]))


def resolve(source: str | PurePath) -> Path:
    """The local file to open for a Hub source, fetching only the weight files it needs.

    Returns the safetensors (or torch) file, or the index of a sharded folder, in
    ``huggingface_hub``'s cache.

    Raises:
        UsageError: the source is malformed, or ``huggingface_hub`` is not installed.
        CheckpointNotFoundError: no such repository, revision, path or weight file, or not
            cached while the Hub cannot be reached.
    """
    ref = parse(source)
    hub = _import(ref)
    files = _listing(hub, ref)
    entry = pick(files, ref)
    folder = _download(hub, ref, [entry])
    if entry.endswith(".index.json"):
        shards = _shards(folder / entry, ref)
        folder = _download(hub, ref, [entry, *(posixpath.join(posixpath.dirname(entry), s) for s in shards)])
    return folder / entry


def fetch(source: str | PurePath, wanted: tuple[tuple[str, ...], ...]) -> Path:
    """The local copy of a Hub folder with, of each group of file names, the first it holds.

    E.g. a PEFT adapter: ``((config,), ("adapter_model.safetensors", "adapter_model.bin"))``.

    Raises:
        CheckpointNotFoundError: the folder holds no file of some group; others as `resolve`.
    """
    ref = parse(source)
    hub = _import(ref)
    folder = ref.path.strip("/")
    here = {posixpath.basename(f) for f in _listing(hub, ref) if posixpath.dirname(f) == folder}
    names = []
    for group in wanted:
        name = next((n for n in group if n in here), None)
        if name is None:
            raise CheckpointNotFoundError(f"{ref}: no {' or '.join(group)} there"
                                          + (f" (it holds {', '.join(sorted(here)[:8])})" if here else ""))
        names.append(posixpath.join(folder, name) if folder else name)
    return _download(hub, ref, names) / folder


def pick(files: list[str], ref: HubRef) -> str:
    """Which file of a repository's listing to open: an index or one weight file (safetensors first)."""
    if ref.path in files:
        return ref.path
    folder = ref.path.strip("/")
    here = {posixpath.basename(f): f for f in files if posixpath.dirname(f) == folder}
    where = f"{ref}" + ("" if ref.path else " (top folder)")
    if folder and not any(f.startswith(folder + "/") for f in files):
        inside = sorted({f.split("/")[0] for f in files if "/" in f})[:8]
        raise CheckpointNotFoundError(f"{where}: no such file or folder in the repository"
                                      + (f"; its folders: {', '.join(inside)}" if inside else ""))
    for kind, first, suffixes in (("safetensors", _SAFETENSORS_FIRST, (".safetensors",)),
                                  ("torch", _TORCH_FIRST, _TORCH_SUFFIXES)):
        for name in first:
            if name in here:
                return here[name]
        indexes = sorted(n for n in here if n.endswith(tuple(s + ".index.json" for s in suffixes)))
        if len(indexes) == 1:
            return here[indexes[0]]
        weights = sorted(n for n in here if n.endswith(suffixes))
        if len(weights) == 1:
            return here[weights[0]]
        if weights or indexes:
            raise UnknownFormatError(f"{where}: several {kind} checkpoints ({', '.join((indexes + weights)[:6])}); "
                                     f"name the file to open: {ref}/FILE")
    below = [f[len(folder) + 1:] if folder else f for f in files if not folder or f.startswith(folder + "/")]
    subfolders = sorted({f.split("/")[0] for f in below if "/" in f})
    hint = f"; its subfolders: {', '.join(subfolders[:8])} (name one: {ref}/SUBFOLDER)" if subfolders else ""
    holds = f"; it holds {', '.join(sorted(here)[:8])}" if here else ""
    raise CheckpointNotFoundError(f"{where}: no weight files (safetensors or torch) there{holds}{hint}")


def in_cache_blobs(folder: Path, target: Path) -> bool:
    """Whether ``target`` (resolved) is a blob of the Hub cache repository whose snapshot holds ``folder``.

    The cache stores ``<repo>/snapshots/<commit>/<file>`` as links to ``<repo>/blobs/<hash>``;
    a shard named inside a snapshot may lead there and nowhere else.
    """
    real = folder.resolve()
    for snap in (real, *real.parents):
        if snap.parent.name == "snapshots":
            blobs = snap.parent.parent / "blobs"
            return blobs.is_dir() and target.parent == blobs.resolve()
    return False


# -- huggingface_hub calls ----------------------------------------------------------------------
def _import(ref: HubRef) -> Any:
    try:
        import huggingface_hub
    except ImportError as e:
        raise UsageError(f"{ref}: reading from the Hugging Face Hub needs the huggingface_hub package: "
                         f"{_INSTALL} (or download the files and give their local path)") from e
    return huggingface_hub


def _errors() -> Any:
    import huggingface_hub.errors as errors

    return errors


def _listing(hub: Any, ref: HubRef) -> list[str]:
    """The repository's files at the revision: from the Hub, or, when it cannot be reached, the cache."""
    errors = _errors()
    try:
        return list(hub.list_repo_files(ref.repo, revision=ref.revision))
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
        raise _not_found(ref, e) from e
    except Exception as e:  # offline, no network, the Hub down: the cached snapshot may serve
        unreachable = e
    try:
        folder = Path(hub.snapshot_download(ref.repo, revision=ref.revision, local_files_only=True))
    except errors.LocalEntryNotFoundError as e:
        raise _not_cached(hub, ref, unreachable) from e
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _download(hub: Any, ref: HubRef, names: list[str]) -> Path:
    """The snapshot folder holding ``names`` (fetched where missing)."""
    errors = _errors()
    try:
        folder = Path(hub.snapshot_download(ref.repo, revision=ref.revision,
                                            allow_patterns=[glob.escape(n) for n in names]))
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
        raise _not_found(ref, e) from e
    except errors.LocalEntryNotFoundError as e:
        raise _not_cached(hub, ref, e) from e
    except (OSError, ValueError) as e:
        raise CheckpointNotFoundError(f"{ref}: downloading {', '.join(names[:3])} failed ({e})") from e
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise CheckpointNotFoundError(f"{ref}: the cached snapshot {folder} lacks {', '.join(missing[:3])} and the "
                                      "Hub could not be reached; download it again with network access")
    return folder


def _shards(index: Path, ref: HubRef) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise CorruptCheckpointError(f"{ref}: the index {index.name} is not valid JSON ({e})") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptCheckpointError(f"{ref}: the index {index.name} has no 'weight_map' of file names")
    shards = sorted(set(weight_map.values()))
    bad = [n for n in shards if n.startswith("/") or ".." in n.split("/") or "\\" in n]
    if bad:
        raise CorruptCheckpointError(f"{ref}: the index {index.name} names shards outside its folder ({bad[0]!r}); "
                                     "refusing it")
    return shards  # checked again against the folder when the index is read


def _cache_dir() -> str:
    import huggingface_hub.constants as constants

    return str(constants.HF_HUB_CACHE)


def _not_found(ref: HubRef, e: Exception) -> CheckpointNotFoundError:
    errors = _errors()
    if isinstance(e, errors.GatedRepoError):
        return CheckpointNotFoundError(f"{ref}: the repository {ref.repo} is gated; accept its terms on "
                                       "huggingface.co and log in (hf auth login, or set HF_TOKEN)")
    if isinstance(e, errors.RevisionNotFoundError):
        return CheckpointNotFoundError(f"{ref}: the repository {ref.repo} has no revision {ref.revision!r}")
    return CheckpointNotFoundError(f"{ref}: no repository {ref.repo} on the Hugging Face Hub (or it is "
                                   "private: log in with hf auth login, or set HF_TOKEN)")


def _not_cached(hub: Any, ref: HubRef, e: Exception | None) -> CheckpointNotFoundError:
    if isinstance(e, _errors().OfflineModeIsEnabled):
        why = "HF_HUB_OFFLINE is set"
    else:
        first = str(e).strip().splitlines()[0][:200] if e is not None and str(e).strip() else ""
        why = f"the Hub cannot be reached ({type(e).__name__}{': ' + first if first else ''})"
    rev = f" at revision {ref.revision}" if ref.revision else ""
    return CheckpointNotFoundError(f"{ref}: the repository {ref.repo}{rev} is not in the local Hugging Face cache "
                                   f"({_cache_dir()}) and {why}; download it once with network "
                                   "access, or check the name")
