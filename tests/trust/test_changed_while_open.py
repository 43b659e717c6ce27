"""A file changed under an open checkpoint: an error naming file and key, never a crash or zeros.

Touching a memory map past its file's end kills the process with SIGBUS, and the bytes of a
page cut in the middle read as zeros. So every scenario runs in a child process: a crash shows
up as a negative return code and fails the scenario instead of killing pytest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import weightsmith

FORMATS = ("safetensors", "torch", "sharded", "dcp")
SCENARIOS = ("cut-before-first-read", "cut-after-mapping", "load-after-cut", "load_-after-cut",
             "cut-in-last-page", "cut-in-last-page-load_", "rewritten-in-place")

# The child writes one JSON line when a scenario starts and one when it ends: a scenario whose
# start is the last line seen is the one that killed the process.
CHILD = textwrap.dedent(r'''
    import json, os, shutil, sys
    from pathlib import Path
    import torch
    from torch import nn
    import weightsmith as ws
    from weightsmith.errors import WeightsmithError

    out = open(sys.argv[2], "a", buffering=1)
    root = Path(sys.argv[1])

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.zeros(64, 64))
            self.b = nn.Parameter(torch.zeros(3000))

    A = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    B = torch.arange(3000, dtype=torch.float32) + 0.5  # 12,000 bytes, over three pages
    B_BYTES = B.numpy().tobytes()

    def write(fmt, where):
        state = {"a": A, "b": B}
        if fmt == "safetensors":
            ws.save(state, where / "m.safetensors"); return where / "m.safetensors"
        if fmt == "torch":
            torch.save(state, where / "m.pt"); return where / "m.pt"
        if fmt == "sharded":
            ws.save(state, where / "sh", max_shard_size=20_000); return where / "sh"
        ws.save(state, where / "dcp", format="dcp"); return where / "dcp"

    def holder(path):
        """The file holding b's bytes, and where they start in it."""
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        for f in files:
            at = f.read_bytes().find(B_BYTES)
            if at >= 0:
                return f, at
        raise AssertionError("b's bytes not found")

    def run(fmt, scenario):
        where = root / f"{fmt}-{scenario}"
        where.mkdir()
        path = write(fmt, where)
        f, at = holder(path)
        ck = ws.open(path)
        model = M()
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if scenario != "cut-before-first-read":
            ck.tensor("a").sum()  # the file is mapped while whole
        if scenario == "rewritten-in-place":
            with open(f, "r+b") as h:
                h.seek(at)
                h.write(torch.full((3000,), 7.0).numpy().tobytes())
        else:
            cut = at + len(B_BYTES) - 8 if scenario.startswith("cut-in-last-page") else at + 100
            os.truncate(f, cut)
        try:
            if scenario.endswith("load_") or scenario == "load_-after-cut":
                ws.load_(model, ck)
                value = model.b.detach()
            elif scenario == "load-after-cut":
                value = ck.load()["b"]
            else:
                value = ck.tensor("b")
            s = float(value.sum())  # touch every byte
            result = {"outcome": "value", "correct": bool(torch.equal(value, B)), "sum": s}
        except WeightsmithError as e:
            result = {"outcome": "error", "type": type(e).__name__, "message": str(e)}
        except Exception as e:  # noqa: BLE001
            result = {"outcome": "other", "type": type(e).__name__, "message": str(e)[:300]}
        result["model_unchanged"] = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        result["file"] = f.name
        return result

    for fmt, scenario in json.loads(sys.argv[3]):
        out.write(json.dumps({"start": [fmt, scenario]}) + "\n")
        out.write(json.dumps({"done": [fmt, scenario], **run(fmt, scenario)}) + "\n")
''')


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, Any]]:
    """Every scenario's outcome; after a crash the child is restarted past the scenario that crashed."""
    tmp = tmp_path_factory.mktemp("changed")
    src = str(Path(weightsmith.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    todo = [(f, s) for f in FORMATS for s in SCENARIOS]
    results: dict[tuple[str, str], dict[str, Any]] = {}
    log = tmp / "log.jsonl"
    while todo:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp), str(log), json.dumps(todo)], env=env,
                              capture_output=True, text=True, timeout=300)
        started = None
        for line in log.read_text().splitlines():
            row = json.loads(line)
            if "start" in row:
                started = tuple(row["start"])
            else:
                results[tuple(row.pop("done"))] = row
                started = None
        if started is not None:  # the child died inside this scenario
            results[started] = {"outcome": "crash", "returncode": proc.returncode, "stderr": proc.stderr[-500:]}
        elif proc.returncode != 0:
            pytest.fail(f"the child failed outside any scenario:\n{proc.stderr[-2000:]}")
        todo = [t for t in todo if t not in results]
        log.write_text("")
    return results


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_file_changed_while_open_is_an_error_naming_file_and_key(
        outcomes: dict[tuple[str, str], dict[str, Any]], fmt: str, scenario: str) -> None:
    got = outcomes[(fmt, scenario)]
    assert got["outcome"] == "error", got
    assert got["type"] == "CorruptCheckpointError", got
    # the first key read from the changed file is named: "b", or "a" when the whole file is checked
    assert got["file"] in got["message"] and ("'b'" in got["message"] or "'a'" in got["message"]), got["message"]
    assert got["model_unchanged"], got


def test_reading_in_a_tensor_whose_last_page_was_cut_is_an_error(tmp_path: Path) -> None:
    """The race the readers' checks leave: a cut after the tensor was handed out, before the copy.

    The cut page stays readable, its lost bytes zeros, so no fault is raised: ``read_in`` asks
    the mapped file for its size. (Runs in this process: a partial page never raises SIGBUS.)
    """
    import torch

    from weightsmith.errors import CorruptCheckpointError
    from weightsmith.io._base import read_in

    path = tmp_path / "m.safetensors"
    weightsmith.save({"b": torch.arange(3000, dtype=torch.float32)}, path)
    tensor = weightsmith.open(path).tensor("b")  # handed out while whole
    read_in(tensor, f"{path}: 'b'")
    os.truncate(path, path.stat().st_size - 8)
    with pytest.raises(CorruptCheckpointError, match=r"m\.safetensors: 'b'.*cut to"):
        read_in(tensor, f"{path}: 'b'")
