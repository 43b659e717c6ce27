"""Kill a process in the middle of `weightsmith.save`, again and again; the file must survive.

A forked writer saves two distinct versions of a checkpoint to one path in a loop; the parent
SIGKILLs it at a random moment, then checks that the path holds one complete version (loaded
equal to it, every CRC-32 matching) and that its own next save removes the dead writer's
temporary file. Then two writers save different versions to the same path at once while the
parent copies the file at random moments: every copy must be one complete version.

    python fuzz/kill_saves.py --kills 50 --mb 300 [--seed 0] [--snapshots 20]

Prints how many kills landed mid-write (a temporary file was left), which versions were found,
how many temporary files later saves removed, and the failures (must be 0).
The test suite imports `make_versions`, `kill_rounds` and `race` from here for a short run.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def make_versions(mb: float) -> list[dict[str, Any]]:
    """Two checkpoints of about ``mb`` MB each, equal in layout, different in every tensor.

    Each has a ``version`` tensor (0 or 1) naming it, and a tied pair (stored once).
    """
    import torch

    chunk = 1 << 20  # float32 elements per tensor: 4 MiB
    n = max(1, int(mb * 1e6 / (4 * chunk)))
    out = []
    for v in (0, 1):
        g = torch.Generator().manual_seed(v)
        state: dict[str, Any] = {f"layer{i}.weight": torch.rand(chunk, generator=g) + v for i in range(n)}
        shared = torch.full((64, 64), float(v))
        state["embed.weight"] = shared
        state["head.weight"] = shared  # tied: stored once
        state["version"] = torch.tensor([v])
        out.append(state)
    return out


def temp_files(path: Path, pid: int | None = None) -> list[Path]:
    """Temporary files of writers saving to ``path`` (of one writer, given its pid)."""
    prefix = f".{path.name}.tmp-" + (f"{pid}-" if pid is not None else "")
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(prefix))


def check_complete(path: Path, versions: list[dict[str, Any]]) -> int:
    """The version at ``path`` after checking it is complete and intact; raises AssertionError."""
    import torch

    import weightsmith
    from weightsmith.trust import verify

    with weightsmith.open(path) as ckpt:
        loaded = ckpt.load()
        v = int(loaded["version"].item())
        want = versions[v]
        assert loaded.keys() == want.keys(), f"keys differ from version {v}"
        for key, tensor in want.items():
            assert torch.equal(loaded[key], tensor), f"{key} differs from version {v}"
        assert loaded["embed.weight"].data_ptr() == loaded["head.weight"].data_ptr(), "the tie is lost"
        del loaded
    report = verify(path)
    assert report.ok and report.has_checksums, f"checksums: {report.mismatched or report.notes}"
    return v


def _writer(path: Path, versions: list[dict[str, Any]], order: list[int]) -> None:
    """The child: save the versions in ``order``, over and over, until killed."""
    import weightsmith

    try:
        i = 0
        while True:
            weightsmith.save(versions[order[i % len(order)]], path)
            i += 1
    finally:
        os._exit(0)


def _fork_writer(path: Path, versions: list[dict[str, Any]], order: list[int]) -> int:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        _writer(path, versions, order)
    return pid


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


@dataclass
class Stats:
    """What the kills found."""

    kills: int = 0
    mid_write: int = 0          # a temporary file of the dead writer was left
    cleaned: int = 0            # ... and the next save removed it
    versions: Counter[int] = field(default_factory=Counter)
    snapshots: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def kill_rounds(path: Path, versions: list[dict[str, Any]], kills: int, rng: random.Random,
                stats: Stats | None = None) -> Stats:
    """Kill a looping writer ``kills`` times at random moments, checking the path after each."""
    import weightsmith

    stats = stats or Stats()
    start = time.perf_counter()
    weightsmith.save(versions[0], path)
    save_s = time.perf_counter() - start
    for k in range(kills):
        pid = _fork_writer(path, versions, [k % 2, 1 - k % 2])
        time.sleep(rng.uniform(0, 2.5 * save_s))  # anywhere in the first two saves or so
        _kill(pid)
        stats.kills += 1
        left = temp_files(path, pid)
        try:
            stats.versions[check_complete(path, versions)] += 1
        except (AssertionError, Exception) as e:  # noqa: BLE001 - every failure is reported
            stats.failures.append(f"kill {k}: {type(e).__name__}: {e}")
        if left:
            stats.mid_write += 1
            weightsmith.save(versions[k % 2], path)  # a later save by a live process
            if temp_files(path, pid):
                stats.failures.append(f"kill {k}: the dead writer's temporary file survived a later save")
            else:
                stats.cleaned += 1
    return stats


def race(path: Path, versions: list[dict[str, Any]], snapshots: int, rng: random.Random,
         stats: Stats | None = None) -> Stats:
    """Two writers save different versions to one path at once; every copy of it must be whole."""
    import weightsmith

    stats = stats or Stats()
    start = time.perf_counter()
    weightsmith.save(versions[0], path)
    save_s = time.perf_counter() - start
    copy = path.with_name("snapshot-" + path.name)
    writers = [_fork_writer(path, versions, [0]), _fork_writer(path, versions, [1])]
    try:
        for k in range(snapshots):
            time.sleep(rng.uniform(0, 2 * save_s))
            copy.write_bytes(path.read_bytes())  # one open: one version, whatever replaces it meanwhile
            try:
                stats.snapshots[check_complete(copy, versions)] += 1
            except (AssertionError, Exception) as e:  # noqa: BLE001 - every failure is reported
                stats.failures.append(f"snapshot {k}: {type(e).__name__}: {e}")
    finally:
        for pid in writers:
            _kill(pid)
    try:
        check_complete(path, versions)
    except (AssertionError, Exception) as e:  # noqa: BLE001
        stats.failures.append(f"after the race: {type(e).__name__}: {e}")
    weightsmith.save(versions[0], path)
    if temp_files(path):
        stats.failures.append(f"temporary files survived a later save: {temp_files(path)}")
    copy.unlink(missing_ok=True)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="how many times to kill the writer")
    parser.add_argument("--mb", type=float, default=300, help="size of each checkpoint version in MB")
    parser.add_argument("--snapshots", type=int, default=20, help="copies taken while two writers race")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--dir", type=Path, default=None, help="folder to save in (default: a temp folder)")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    versions = make_versions(args.mb)
    nbytes = sum(t.numel() * t.element_size() for k, t in versions[0].items() if k != "head.weight")
    folder = Path(tempfile.mkdtemp(dir=args.dir, prefix="kill-saves-"))
    path = folder / "model.safetensors"
    start = time.perf_counter()
    try:
        stats = kill_rounds(path, versions, args.kills, rng)
        race(path, versions, args.snapshots, rng, stats)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"checkpoint size:          {nbytes / 1e6:,.0f} MB per version, saved to {folder.parent}")
    print(f"kills:                    {stats.kills}")
    print(f"  killed mid-write:       {stats.mid_write} (a temporary file was left)")
    print(f"  temp files removed by the next save: {stats.cleaned} of {stats.mid_write}")
    print(f"  version found after kill: {dict(sorted(stats.versions.items()))}")
    copies = sum(stats.snapshots.values())
    print(f"two writers racing: {copies} copies, versions {dict(sorted(stats.snapshots.items()))}")
    print(f"failures (must be 0):     {len(stats.failures)}")
    print(f"time:                     {time.perf_counter() - start:.0f} s (seed {args.seed})")
    for failure in stats.failures[:10]:
        print(f"  {failure}")
    return 1 if stats.failures else 0


if __name__ == "__main__":
    sys.exit(main())
