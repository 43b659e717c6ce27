"""Small files built to claim large resources: opening, scanning and converting them stays bounded.

Each bomb is opened, scanned (``scan_globals``) and, where it holds tensors, converted, in one
child process under an address-space limit (``RLIMIT_AS``, a safety net) and a time guard. The
child resets its peak-memory mark before each case (``/proc/self/clear_refs``) and reports the
peak growth, the time and the outcome. The bound asserted: every outcome is success or a
`WeightsmithError`, and peak memory grows by at most twice the file's size plus 256 MiB.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import weightsmith
from weightsmith.errors import CorruptCheckpointError
from weightsmith.io.torchfile import MAX_EXPANDED_BYTES

_LIMIT_GROWTH = 256 << 20


def _torch_bytes(obj: object, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)  # type: ignore[arg-type]
    return buf.getvalue()


def _replace_data_pkl(archive: bytes, body: bytes, *, deflate: bool = False) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if info.filename.endswith("/data.pkl"):
                with dst.open(zipfile.ZipInfo(info.filename), "w") if not deflate else dst.open(
                        _deflated(info.filename), "w") as member:
                    for chunk in (body if isinstance(body, list) else [body]):
                        member.write(chunk)
            else:
                dst.writestr(info.filename, src.read(info))
    return out.getvalue()


def _deflated(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def _nested_lists(depth: int) -> bytes:
    # {"w": <tensor>, "deep": [[[...]]]}: EMPTY_LIST depth times, then APPEND depth-1 times
    plain = _torch_bytes({"w": torch.arange(4.0)})
    with zipfile.ZipFile(io.BytesIO(plain)) as zf:
        body = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    assert body.endswith(b"s.")  # ... SETITEM STOP: the dict is on top again
    deep = b"X\x04\x00\x00\x00deep" + b"]" * depth + b"a" * (depth - 1) + b"s"
    return _replace_data_pkl(plain, body[:-1] + deep + b".")


def _deflate_bomb(repeats: int) -> list[bytes]:
    plain = _torch_bytes({"w": torch.arange(4.0)})
    with zipfile.ZipFile(io.BytesIO(plain)) as zf:
        body = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    filler = b"N0" * (1 << 19)  # NONE POP: valid opcodes, 1 MiB a chunk
    return [body[:2], *([filler] * repeats), body[2:]]


def _bombs(folder: Path, *, scale: int = 1) -> list[tuple[str, Path, tuple[str, ...]]]:
    """(name, path, operations) for every bomb; ``scale`` 10 gives the sizes of the issue's figures."""
    out: list[tuple[str, Path, tuple[str, ...]]] = []

    def add(name: str, data: bytes, ops: tuple[str, ...], suffix: str = ".pt") -> None:
        path = folder / f"{name}{suffix}"
        path.write_bytes(data)
        out.append((name, path, ops))

    plain = _torch_bytes({"w": torch.arange(4.0)})
    # the C unpickler preallocates its memo up to the index: 2**29 entries, 4 GiB
    add("long-binput-2^29", b"\x80\x02]r\x00\x00\x00\x20.", ("open", "scan"), ".pkl")
    add("long-binput-max", b"\x80\x02]r\xff\xff\xff\xff0]r\xfe\xff\xff\xff.", ("open", "scan"), ".pkl")
    add("long-binput-in-data.pkl", _replace_data_pkl(plain, b"\x80\x02}r\x00\x00\x00\x20." ), ("open", "scan"))
    # lengths far past the file
    add("binbytes8-2^40", b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b"xx.", ("open", "scan"), ".pkl")
    add("frame-2^62", b"\x80\x04\x95" + (1 << 62).to_bytes(8, "little") + b"N.", ("open", "scan"), ".pkl")
    add("text-int-10^6-digits", b"\x80\x02L" + b"9" * 10**6 + b"L\n.", ("open", "scan"), ".pkl")
    # nested lists next to a tensor: 10**5 levels (200 KB), 10**6 (2 MB) at scale 10
    add("nested-lists", _nested_lists(10**5 * scale), ("open", "scan"))
    # a deflated data.pkl that inflates to 64 MiB of valid opcodes (640 MiB at scale 10)
    add("deflated-data.pkl", _replace_data_pkl(plain, _deflate_bomb(64 * scale), deflate=True),  # type: ignore[arg-type]
        ("open", "scan"))
    # a 16-byte storage viewed with stride 0 as 4 GiB, and as 2**60 elements
    add("expanded-4GiB", _torch_bytes({"w": torch.arange(4.0).expand(1 << 28, 4)}), ("open", "scan", "convert"))
    add("expanded-2^30x2^30", _torch_bytes({"w": torch.arange(1.0).expand(1 << 30, 1 << 30)}),
        ("open", "scan", "convert"))
    return out


_CHILD = r"""
import json, os, resource, sys, time
import weightsmith
from weightsmith.errors import WeightsmithError
from weightsmith.trust import scan_globals

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0

# a safety net only: the bound checked is the peak growth reported below
vm = status("VmSize")
resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), vm + (3 << 30)))
cases = json.loads(sys.argv[1])
results = []
for name, path, op in cases:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark
        resettable = True
    except OSError:
        resettable = False
    before = status("VmRSS")
    t0 = time.perf_counter()
    outcome = "ok"
    try:
        if op == "open":
            ck = weightsmith.open(path)
            ck.load()
            ck.close()
        elif op == "scan":
            scan_globals(path)
        else:
            weightsmith.convert(path, path + ".safetensors")
    except WeightsmithError as e:
        outcome = "error: " + type(e).__name__ + ": " + str(e)[:300]
    except BaseException as e:  # noqa: BLE001 - reported, then asserted absent
        outcome = "UNCAUGHT " + type(e).__name__ + ": " + str(e)[:300]
    results.append({"name": name, "op": op, "outcome": outcome, "seconds": time.perf_counter() - t0,
                    "peak_growth": status("VmHWM") - before if resettable else None,
                    "size": os.path.getsize(path),
                    "wrote": os.path.exists(path + ".safetensors")})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def bomb_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    folder = tmp_path_factory.mktemp("bombs")
    cases = [(name, str(path), op) for name, path, ops in _bombs(folder) for op in ops]
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cases)], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results: list[dict[str, object]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def test_every_bomb_ends_in_success_or_a_weightsmith_error(bomb_results: list[dict[str, object]]) -> None:
    uncaught = [f"{r['name']} {r['op']}: {r['outcome']}" for r in bomb_results
                if str(r["outcome"]).startswith("UNCAUGHT")]
    assert not uncaught, "\n".join(uncaught)
    assert len(bomb_results) == 22


def test_every_bomb_stays_within_twice_its_size_plus_256_mib(bomb_results: list[dict[str, object]]) -> None:
    if any(r["peak_growth"] is None for r in bomb_results):
        pytest.skip("/proc/self/clear_refs is not writable here: peak memory cannot be reset per case")
    over = [f"{r['name']} {r['op']}: {int(r['peak_growth']) >> 20} MiB for {r['size']:,} bytes"  # type: ignore[call-overload]
            for r in bomb_results
            if int(r["peak_growth"]) > 2 * int(r["size"]) + _LIMIT_GROWTH]  # type: ignore[call-overload]
    assert not over, "\n".join(over)


def test_expanded_tensors_are_refused_with_the_stated_limit_and_convert_writes_nothing(
        bomb_results: list[dict[str, object]]) -> None:
    for r in bomb_results:
        if str(r["name"]).startswith("expanded"):
            assert "CorruptCheckpointError" in str(r["outcome"]) or r["op"] == "scan", r
            if r["op"] != "scan":
                assert f"{MAX_EXPANDED_BYTES >> 20} MiB" in str(r["outcome"]), r
            assert not r["wrote"], r


def test_decompression_bomb_is_refused_by_its_inflated_size(bomb_results: list[dict[str, object]]) -> None:
    outcomes = [str(r["outcome"]) for r in bomb_results if r["name"] == "deflated-data.pkl"]
    assert outcomes and all("decompression bomb" in o for o in outcomes), outcomes


def test_an_expanded_tensor_within_the_limit_reads_like_torch(tmp_path: Path) -> None:
    path = tmp_path / "expanded-small.pt"
    source = torch.arange(4.0).expand(1000, 4)
    torch.save({"w": source}, path)
    got = weightsmith.open(path).load()["w"]
    assert torch.equal(got, torch.load(path, weights_only=True)["w"]) and got.shape == (1000, 4)


def test_a_state_dict_at_the_limit_and_one_past_it(tmp_path: Path) -> None:
    rows = MAX_EXPANDED_BYTES // 16  # four float32 values per row: exactly the limit
    at = tmp_path / "at.pt"
    torch.save({"w": torch.arange(4.0).expand(rows, 4)}, at)
    assert tuple(weightsmith.open(at)["w"].shape) == (rows, 4)
    past = tmp_path / "past.pt"
    torch.save({"w": torch.arange(4.0).expand(rows + 1, 4)}, past)
    with pytest.raises(CorruptCheckpointError, match="expanded"):
        weightsmith.open(past)


if __name__ == "__main__":  # figures for the report: python tests/trust/test_resource_bombs.py
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        t0 = __import__("time").perf_counter()
        cases = [(name, str(path), op) for name, path, ops in _bombs(Path(tmp), scale=10) for op in ops]
        print(f"built in {__import__('time').perf_counter() - t0:.1f} s")
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cases)], capture_output=True, text=True,
                              check=False)
        for r in json.loads(proc.stdout.strip().splitlines()[-1]):
            print(f"{r['name']:28} {r['op']:8} {r['size']:>11,} B  {r['seconds']:7.2f} s  "
                  f"peak +{(r['peak_growth'] or 0) >> 20:5} MiB  {str(r['outcome'])[:90]}")
