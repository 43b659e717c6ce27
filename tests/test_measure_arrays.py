"""Files read as numpy arrays (no torch) give the numbers the torch path gives, and the read
commands never import torch."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import weightsmith
from weightsmith.comparison import diff
from weightsmith.errors import CorruptCheckpointError
from weightsmith.health import check
from weightsmith.tensor_stats import stats

FUZZ = Path(__file__).resolve().parents[1] / "fuzz" / "found"


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 33, generator=g)
    noisy = 1.0 + 1e-3 * torch.randn(1000, generator=g)  # mean far above the spread
    bad = torch.randn(50, generator=g)
    bad[3], bad[7], bad[9] = float("nan"), float("inf"), -float("inf")
    return {
        "f32": w, "f16": w.half(), "bf16": w.bfloat16(), "f64": w.double() * 1e3, "shifted": noisy,
        "i64": torch.randint(-2**40, 2**40, (300,), generator=g), "i32": torch.randint(-9, 9, (7, 5), generator=g),
        "u8": torch.randint(0, 255, (40,), generator=g, dtype=torch.uint8), "flags": torch.rand(30, generator=g) > 0.5,
        "e4m3": (w * 4).to(torch.float8_e4m3fn), "e5m2": w.to(torch.float8_e5m2),
        "c64": torch.randn(6, 4, generator=g, dtype=torch.complex64), "bad": bad, "zeros": torch.zeros(9),
        "const": torch.full((4, 4), 0.25), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3),
    }


def _write(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        extra = {"view": state["f32"].t(), "rows": state["f32"][10:20]}  # a transposed view, a slice
        torch.save({**state, **extra}, path)
    return path


def _same(x: float, y: float) -> bool:
    return (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-300)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    ckpt = weightsmith.open(path)
    return {k: ckpt.tensor(k) for k in ckpt.keys()}


@pytest.mark.parametrize("kernel", ["numpy", "compiled"])
@pytest.mark.parametrize("name", ["a.safetensors", "a.pt"])
def test_stats_from_a_file_equal_the_torch_path(tmp_path, monkeypatch, name, kernel):
    monkeypatch.setenv("WEIGHTSMITH_KERNEL", kernel)
    path = _write(_state(0), tmp_path / name)
    from_file, from_tensors = stats(path), stats(_tensors(path))
    assert [s.key for s in from_file] == [s.key for s in from_tensors]
    assert from_file.skipped == from_tensors.skipped and from_file.nbytes == from_tensors.nbytes
    for a, b in zip(from_file, from_tensors):
        for field in ("mean", "std", "min", "max", "absmax", "l2", "zero_fraction"):
            assert _same(getattr(a, field), getattr(b, field)), (a.key, field, getattr(a, field), getattr(b, field))
        assert (a.dtype, a.shape, a.numel, a.nan_count, a.inf_count) == (b.dtype, b.shape, b.numel, b.nan_count,
                                                                          b.inf_count)
    assert from_file["bad"].nan_count == 1 and from_file["bad"].inf_count == 2
    assert check(path).findings == check(_tensors(path)).findings


@pytest.mark.parametrize("name", ["a.safetensors", "a.pt"])
def test_diff_of_files_equals_the_torch_path(tmp_path, name):
    a = _write(_state(0), tmp_path / name)
    b = _write(_state(1), tmp_path / f"b{a.suffix}")
    from_files = diff(a, b, atol=1e-3, rtol=1e-2)
    from_tensors = diff(_tensors(a), _tensors(b), atol=1e-3, rtol=1e-2)
    assert from_files.skipped == from_tensors.skipped
    assert len(from_files.tensors) == len(from_tensors.tensors) > 15
    for x, y in zip(from_files.tensors, from_tensors.tensors):
        assert (x.key, x.changed, x.nan_a, x.nan_b, x.identical) == (y.key, y.changed, y.nan_a, y.nan_b,
                                                                    y.identical)
        for field in ("max_abs", "rel_l2", "cosine", "l2_a", "l2_diff"):
            assert _same(getattr(x, field), getattr(y, field)), (x.key, field)


def test_blocks_and_pieces_add_up_to_the_whole(tmp_path, monkeypatch):
    a = _write(_state(0), tmp_path / "a.safetensors")
    b = _write(_state(1), tmp_path / "b.safetensors")
    whole = diff(a, b, atol=1e-3)
    diff_module = sys.modules["weightsmith.comparison"]
    monkeypatch.setattr(diff_module, "CHUNK_ELEMENTS", 37)
    monkeypatch.setattr(diff_module, "BLOCK_ELEMENTS", 5)
    for x, y in zip(diff(a, b, atol=1e-3).tensors, whole.tensors):
        assert (x.key, x.changed, x.nan_a, x.nan_b) == (y.key, y.changed, y.nan_a, y.nan_b)
        # pieces holding a NaN are taken apart in float64, others in float32: equal to float32 rounding
        for field in ("max_abs", "rel_l2", "cosine", "l2_a", "l2_diff"):
            assert math.isclose(getattr(x, field), getattr(y, field), rel_tol=1e-6), (x.key, field)


def test_stats_in_blocks_equal_the_whole(tmp_path, monkeypatch):
    path = _write(_state(0), tmp_path / "a.safetensors")
    whole = stats(path)
    monkeypatch.setattr(sys.modules["weightsmith._measure"], "BLOCK_ELEMENTS", 7)
    blocks = stats(path)
    for a, b in zip(blocks, whole):
        assert (a.key, a.nan_count, a.inf_count, a.min, a.max, a.zero_fraction) == (
            b.key, b.nan_count, b.inf_count, b.min, b.max, b.zero_fraction)
        for field in ("mean", "std", "l2"):
            assert math.isclose(getattr(a, field), getattr(b, field), rel_tol=1e-6, abs_tol=1e-12) or (
                math.isnan(getattr(a, field)) and math.isnan(getattr(b, field))), (a.key, field)
    assert blocks["const"].std == 0.0 and blocks["shifted"].std == pytest.approx(
        float(_state(0)["shifted"].double().std(correction=0)), rel=1e-4)


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file(state, str(path)) if path.suffix == ".safetensors" else torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_float4_values_are_compared(tmp_path, suffix):
    packed = torch.tensor([[0x21, 0x43], [0x00, 0x7F]], dtype=torch.uint8)  # two float4 values a byte
    changed = packed.clone()
    changed[1, 1] = 0x70  # the nibble 0xF (-6.0) becomes 0x0 (0.0); 0x7 (6.0) stays
    a = _save({"w": packed.view(torch.float4_e2m1fn_x2)}, tmp_path / f"a{suffix}")
    b = _save({"w": changed.view(torch.float4_e2m1fn_x2)}, tmp_path / f"b{suffix}")
    same, other = diff(a, a), diff(a, b)
    assert same.equal and same.tensors[0].method == "compared"
    t = other.tensors[0]
    assert not other.equal and t.changed == 1 and t.max_abs == 6.0
    from_tensors = diff({"w": packed.view(torch.float4_e2m1fn_x2)}, {"w": changed.view(torch.float4_e2m1fn_x2)})
    assert (from_tensors.tensors[0].changed, from_tensors.tensors[0].max_abs) == (1, 6.0)


def test_deeply_nested_checksum_metadata_is_a_corrupt_file():
    path = FUZZ / "deep-crc32-metadata.safetensors"
    with pytest.raises(CorruptCheckpointError, match="deep-crc32-metadata.safetensors.*nested too deeply"):
        diff(path, path)


def _imported(args: list[str]) -> set[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "weightsmith", *args],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode in (0, 1), done.stderr[-2000:]
    names = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
             if line.startswith("import time:")}
    assert "weightsmith.cli" in names  # the listing is there to be read
    return {n.split(".")[0] for n in names}


@pytest.mark.parametrize("name", ["a.safetensors", "a.pt"])
def test_read_commands_on_files_never_import_torch(tmp_path, name):
    a = _write(_state(0), tmp_path / name)
    b = _write(_state(1), tmp_path / f"b{a.suffix}")
    for args in (["check", str(a)], ["check", "--verify", str(a)], ["diff", str(a), str(b)],
                 ["inspect", str(a)], ["report", str(a), "-o", str(tmp_path / "r.html"), "--compare", str(b)]):
        assert "torch" not in _imported(args), args


def test_inspect_into_a_pipe_imports_no_rich_and_prints_what_rich_would(tmp_path, monkeypatch):
    """Piped, the listing is plain rows that need no rich; with rich deciding (its own variable
    set) the same rows come out, so skipping the import changes nothing but the time."""
    a = _write(_state(0), tmp_path / "a.safetensors")
    assert "rich" not in _imported(["inspect", str(a)])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    quick = subprocess.run([sys.executable, "-m", "weightsmith", "inspect", str(a)], capture_output=True,
                           text=True, env=env, timeout=120)
    decided = subprocess.run([sys.executable, "-m", "weightsmith", "inspect", str(a)], capture_output=True,
                             text=True, env={**env, "TTY_COMPATIBLE": "0"}, timeout=120)
    assert quick.returncode == decided.returncode == 0
    assert quick.stdout == decided.stdout and "f32" in quick.stdout
