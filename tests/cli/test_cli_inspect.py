"""``weightsmith inspect``: table, JSON, folding, filters, errors, and a start-up without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import weightsmith as ws
from weightsmith.cli import cli, main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed command, in a fresh interpreter."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "weightsmith", *args], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.fixture
def st_file(tmp_path: Path, mlp: nn.Module) -> Path:
    path = tmp_path / "mlp.safetensors"
    ws.save(mlp, path)
    return path


@pytest.fixture
def layered(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    sd = {f"layers.{i}.{p}": torch.randn(5, 3) if p == "weight" else torch.randn(5)
          for i in range(4) for p in ("weight", "bias")}
    sd["head.weight"] = torch.randn(2, 5)
    path = tmp_path / "layered.pt"
    torch.save(sd, path)
    return path


def test_table(st_file: Path) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(st_file)], terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert str(st_file) in result.output
    row = next(line for line in lines if "0.weight" in line)
    assert "(8, 4)" in row and "float32" in row and "32" in row and "128 B" in row
    assert "4 tensors, 49 elements" in result.output


def test_json_totals(st_file: Path) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(st_file), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["schema"] == "weightsmith.inspect/1"
    assert (data["tensors"], data["parameters"], data["nbytes"]) == (4, 49, 196)
    assert [r["key"] for r in data["rows"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_json_counts_ties_once(tmp_path: Path, tied_mlp: nn.Module) -> None:
    path = tmp_path / "tied.safetensors"
    ws.save(tied_mlp, path)
    data = json.loads(CliRunner().invoke(cli, ["inspect", str(path), "--json"]).output)
    assert (data["tensors"], data["parameters"], data["nbytes"]) == (8, 121, 484)
    rows = {r["key"]: r for r in data["rows"]}
    assert rows["3.weight"]["tied_with"] == ["1.weight"]


def test_fold(layered: Path) -> None:
    data = json.loads(CliRunner().invoke(cli, ["inspect", str(layered), "--fold", "--json"]).output)
    assert [(r["key"], r["count"], r["numel"]) for r in data["rows"]] == [
        ("layers.#.weight", 4, 60), ("layers.#.bias", 4, 20), ("head.weight", 1, 10)]
    table = CliRunner().invoke(cli, ["inspect", str(layered), "--fold"], terminal_width=200)
    assert table.exit_code == 0
    assert "layers.#.weight  ×4" in table.output
    assert "layers.0.weight" not in table.output


def test_filter_and_sort(layered: Path) -> None:
    data = json.loads(CliRunner().invoke(
        cli, ["inspect", str(layered), "--filter", "layers.*.bias", "--json"]).output)
    assert [r["key"] for r in data["rows"]] == [f"layers.{i}.bias" for i in range(4)]
    assert data["parameters"] == 20
    data = json.loads(CliRunner().invoke(cli, ["inspect", str(layered), "--sort", "size", "--json"]).output)
    sizes = [r["nbytes"] for r in data["rows"]]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 60


def test_root_option(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "ema.pt"
    torch.save({"model": mlp.state_dict(), "model_ema": {"only.weight": torch.ones(3)}}, path)
    data = json.loads(CliRunner().invoke(cli, ["inspect", str(path), "--root", "model_ema", "--json"]).output)
    assert data["root"] == "model_ema" and [r["key"] for r in data["rows"]] == ["only.weight"]


def test_missing_file_is_a_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    proc = run_cli("inspect", str(missing))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: ") and str(missing) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    proc = run_cli("--debug", "inspect", str(tmp_path / "missing.safetensors"))
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "CheckpointNotFoundError" in proc.stderr


def test_error_exit_code_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not valid UTF-8 JSON" in err and len(err.strip().splitlines()) == 1


def test_unsafe_file_asks_for_trust(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class Payload:
        def __reduce__(self) -> tuple:
            return print, ("ran",)

    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "p": Payload()}, path)
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(path)])
    assert exit_info.value.code == 2
    out = capsys.readouterr()
    assert "builtins.print" in out.err and "--trust" in out.err and "ran" not in out.out


def test_no_match_filter_is_an_error(st_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(st_file), "--filter", "decoder.*"])
    assert exit_info.value.code == 2
    assert "matched nothing" in capsys.readouterr().err


def test_subprocess_table(st_file: Path) -> None:
    proc = run_cli("inspect", str(st_file))
    assert proc.returncode == 0, proc.stderr
    assert "0.weight" in proc.stdout and "4 tensors, 49 elements" in proc.stdout
    assert proc.stderr == ""


@pytest.mark.parametrize("kind", ["safetensors", "torch", "torch-legacy"])
def test_inspect_never_imports_torch(tmp_path: Path, mlp: nn.Module, kind: str) -> None:
    path = tmp_path / ("m.safetensors" if kind == "safetensors" else "m.pt")
    if kind == "safetensors":
        ws.save(mlp, path)
    else:
        torch.save(mlp.state_dict(), path, _use_new_zipfile_serialization=kind == "torch")
    script = textwrap.dedent(f"""
        import sys
        from weightsmith.cli import main
        for args in (["inspect", {str(path)!r}], ["inspect", {str(path)!r}, "--json", "--fold"]):
            try:
                main(args)
            except SystemExit as e:
                assert not e.code, e.code
        assert "torch" not in sys.modules, "torch was imported"
        assert "numpy" not in sys.modules, "numpy was imported"
        print("TORCH-FREE")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH-FREE" in proc.stdout and "0.weight" in proc.stdout


def test_layout_names_the_shard_file_of_each_tensor(tmp_path: Path) -> None:
    state = {"a": torch.zeros(64, 64), "b": torch.zeros(64, 64), "c": torch.zeros(3)}
    ws.save(state, tmp_path / "sharded", max_shard_size=20_000)  # 16 KB per matrix: one per shard
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "sharded"), "--layout", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["key"]: r["stored_in"] for r in json.loads(result.output)["rows"]}
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    assert rows == {k: [index[k]] for k in state}
    assert len(set(index.values())) > 1
    plain = CliRunner().invoke(cli, ["inspect", str(tmp_path / "sharded"), "--json"])
    assert all("stored_in" not in r for r in json.loads(plain.output)["rows"])
    table = CliRunner().invoke(cli, ["inspect", str(tmp_path / "sharded"), "--layout"], env={"COLUMNS": "200"})
    assert "stored in" in table.output and index["a"] in table.output


def test_piped_output_is_plain_rows_with_every_name_whole(minilm_dir: Path) -> None:
    proc = run_cli("inspect", str(minilm_dir / "model.safetensors"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split() == ["name", "shape", "dtype", "elements", "size"]  # no empty "tied with"
    assert "│" not in proc.stdout and "…" not in proc.stdout
    names = [line.split()[0] for line in lines[2:106]]
    assert len(names) == 104 and "encoder.layer.5.attention.output.LayerNorm.weight" in names
    assert lines[106:] == ["104 tensors, 22,713,728 elements (tied counted once), 86.6 MiB",
                           "  int64: 1 tensors, 512 elements, 4.0 KiB",
                           "  float32: 103 tensors, 22,713,216 elements, 86.6 MiB"]


def test_terminal_table_fits_80_columns(minilm_dir: Path) -> None:
    from rich.console import Console

    from weightsmith.listing import list_checkpoint

    console = Console(width=80, record=True, color_system=None, file=open(os.devnull, "w"))
    console.print(list_checkpoint(ws.open(minilm_dir / "model.safetensors")))
    text = console.export_text()
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert len(rows) == 104 and all(len(line) <= 80 for line in text.splitlines())
    big = next(line for line in rows if "word_embeddings" in line)
    assert "(30522, 384)" in big and "float32" in big and "11,720,448" in big and "44.7 MiB" in big
    assert any("l.5." in line for line in rows)  # the layer index survives the elision
    assert "tied with" not in text
