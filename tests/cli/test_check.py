"""`weightsmith check PATH`: exit 0 healthy, 1 on findings, 2 on errors."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import weightsmith
from weightsmith.cli import cli


def _has_open():
    try:
        return callable(weightsmith.open)
    except (AttributeError, ImportError):
        return False


pytestmark = pytest.mark.skipif(not _has_open(), reason="weightsmith.open is not available yet")


@pytest.fixture
def healthy(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "healthy.safetensors"
    save_file({"0.weight": torch.randn(8, 4), "0.bias": torch.randn(8)}, str(path))
    return path


@pytest.fixture
def broken(tmp_path):
    torch.manual_seed(0)
    weight = torch.randn(8, 4)
    weight[2, 3] = float("nan")
    path = tmp_path / "broken.safetensors"
    save_file({"0.weight": weight, "0.bias": torch.randn(8), "2.weight": torch.randn(1, 8) * 1e5},
              str(path))
    return path


def run(*args):
    return CliRunner().invoke(cli, ["check", *map(str, args)])


def test_healthy_file_exits_0(healthy):
    result = run(healthy)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "healthy: 2 tensors checked"


def test_nan_exits_1_and_names_the_tensor(broken):
    result = run(broken)
    assert result.exit_code == 1, result.output
    assert "0.weight" in result.output and "1 of 32 values are NaN" in result.output
    assert "2.weight" in result.output and "exploding" in result.output


def test_json_output_is_the_report(broken):
    result = run(broken, "--json")
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["schema"] == "weightsmith.check/1" and data["ok"] is False
    health = data["health"]
    assert health["schema"] == "weightsmith.health/1" and health["ok"] is False
    assert [(f["key"], f["kind"]) for f in health["findings"]] == [("0.weight", "nan"),
                                                                ("2.weight", "exploding")]


def test_select_and_max_abs_change_the_verdict(broken):
    assert run(broken, "--select", "0.bias").exit_code == 0
    assert run(broken, "--select", "*.weight", "--select", "!0.weight").exit_code == 1
    assert run(broken, "--select", "2.weight", "--max-abs", "1e7").exit_code == 0


def test_errors_exit_2(tmp_path, healthy):
    missing = run(tmp_path / "nope.safetensors")
    assert missing.exit_code == 2 and "error:" in missing.output
    typo = run(healthy, "--select", "decoder.*")
    assert typo.exit_code == 2 and "matched nothing" in typo.output
    bad = run(healthy, "--max-abs", "-3")
    assert bad.exit_code == 2 and "max_abs" in bad.output


@pytest.fixture
def zero_bias(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "zero_bias.safetensors"
    save_file({"0.weight": torch.randn(8, 4), "0.bias": torch.zeros(8)}, str(path))
    return path


def test_an_all_zero_bias_is_a_warning_and_exits_0(zero_bias):
    result = run(zero_bias)
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().endswith("healthy: 0 errors, 1 warning in 1 of 2 tensors checked")
    assert "0.bias" in result.output and "warning" in result.output


def test_strict_checks_and_ignore_decide_what_fails(zero_bias):
    assert run(zero_bias, "--strict").exit_code == 1
    assert run(zero_bias, "--checks", "nan,all_zero").exit_code == 1  # a check asked for by name fails
    assert run(zero_bias, "--checks", "nan,inf").exit_code == 0
    ignored = run(zero_bias, "--ignore", "all_zero", "--strict")
    assert ignored.exit_code == 0 and ignored.output.strip() == "healthy: 2 tensors checked"
    data = json.loads(run(zero_bias, "--json").output)
    assert data["ok"] is True and data["health"]["warnings"] == 1 and data["health"]["errors"] == 0
    assert data["health"]["findings"][0]["severity"] == "warning"


def test_an_unknown_check_name_exits_2(zero_bias):
    result = run(zero_bias, "--ignore", "zeros")
    assert result.exit_code == 2
    assert result.output == "error: unknown check zeros; choose from nan, inf, all_zero, constant, exploding\n"


def test_the_real_minilm_passes_check(minilm_dir):
    result = run(minilm_dir / "model.safetensors", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().endswith("healthy: 0 errors, 1 warning in 1 of 104 tensors checked")
    assert run(minilm_dir / "model.safetensors", "--quiet", "--strict").exit_code == 1
