"""``weightsmith report PATH -o FILE``: writes the page, prints its path, refuses to overwrite."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from weightsmith.cli import cli

pytest.importorskip("plotly")


def run(*args):
    return CliRunner().invoke(cli, ["report", *map(str, args)])


def data_of(path: Path) -> dict:
    m = re.search(r'<script id="ws-data" type="application/json">(.*?)</script>',
                  path.read_text(encoding="utf-8"), re.S)
    return json.loads(m.group(1))


@pytest.fixture
def pair(tmp_path):
    torch.manual_seed(0)
    base = {"0.weight": torch.randn(8, 4), "0.bias": torch.randn(8), "2.weight": torch.randn(1, 8)}
    tuned = {**base, "2.weight": base["2.weight"] * 2}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "tuned.safetensors", tmp_path / "base.safetensors"


def test_writes_the_report_and_prints_its_path(tmp_path, pair):
    out = tmp_path / "report.html"
    result = run(pair[0], "-o", out)
    assert result.exit_code == 0, result.output
    assert result.output == f"{out}\n"  # no progress bar when not on a terminal
    data = data_of(out)
    assert data["tensors"] == 3 and data["ok"] is True and "compare" not in data


def test_compare_adds_the_change_per_layer(tmp_path, pair):
    out = tmp_path / "report.html"
    result = run(pair[0], "-o", out, "--compare", pair[1], "--quiet")
    assert result.exit_code == 0, result.output
    changes = {c["key"]: c["rel_l2"] for c in data_of(out)["compare"]["changes"]}
    assert changes["0.weight"] == 0.0
    assert changes["2.weight"] == pytest.approx(1.0)  # ‖2w − w‖ / ‖w‖
    assert "Relative L2 change per layer" in out.read_text(encoding="utf-8")


def test_refuses_to_overwrite_without_force(tmp_path, pair):
    out = tmp_path / "report.html"
    out.write_text("keep me")
    refused = run(pair[0], "-o", out)
    assert refused.exit_code == 2
    assert "exists; pass --force" in refused.output and out.read_text() == "keep me"
    forced = run(pair[0], "-o", out, "--force")
    assert forced.exit_code == 0, forced.output
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_select_and_max_histograms_reach_the_library(tmp_path, pair):
    out = tmp_path / "report.html"
    result = run(pair[0], "-o", out, "--select", "0.*", "--max-histograms", "1")
    assert result.exit_code == 0, result.output
    data = data_of(out)
    assert [s["key"] for s in data["stats"]] == ["0.bias", "0.weight"]
    assert list(data["histograms"]) == ["0.weight"]  # the larger of the two


def test_errors_exit_2_and_write_nothing(tmp_path, pair):
    missing = run(tmp_path / "nope.safetensors", "-o", tmp_path / "a.html")
    assert missing.exit_code == 2 and "error:" in missing.output
    typo = run(pair[0], "-o", tmp_path / "b.html", "--select", "decoder.*")
    assert typo.exit_code == 2 and "matched nothing" in typo.output
    bad = run(pair[0], "-o", tmp_path / "c.html", "--max-histograms", "-1")
    assert bad.exit_code == 2 and "max_histograms must be" in bad.output
    no_dir = run(pair[0], "-o", tmp_path / "sub" / "d.html")
    assert no_dir.exit_code == 2 and "does not exist" in no_dir.output
    assert not any(p.suffix == ".html" for p in tmp_path.rglob("*"))
    assert run(pair[0]).exit_code == 2  # -o is required
