"""`weightsmith check PATH`: exit 0 healthy, 1 on findings, 2 on errors; what a pickle would call."""

import json
import os
import pickle

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import weightsmith
from weightsmith.cli import cli


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

# ---- the pickle scan: `weightsmith check` as the one verification command: pickle globals and --verify checksums.


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('x')",))


def test_a_file_that_would_run_code_is_a_finding_and_nothing_runs(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "hostile.pt"
    torch.save({"w": torch.zeros(2), "evil": _Payload(str(marker))}, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    result = CliRunner().invoke(cli, ["check", str(path), "--json"])
    assert result.exit_code == 1, result.output
    data = json.loads(result.output)
    assert data["schema"] == "weightsmith.check/1" and data["ok"] is False
    refused = [g["name"] for g in data["globals"]["globals"] if g["status"] == "refused"]
    assert "builtins.exec" in refused
    assert "health" not in data  # its tensors are not read
    assert not marker.exists()


def test_a_plain_torch_file_lists_only_allowed_globals_and_passes(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.randn(3, generator=torch.Generator().manual_seed(0))}, path)
    result = CliRunner().invoke(cli, ["check", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {g["status"] for g in data["globals"]["globals"]} == {"allowed"}
    assert data["health"]["schema"] == "weightsmith.health/1"


def test_verify_finds_a_flipped_byte_the_format_does_not_notice(tmp_path):
    path = tmp_path / "m.safetensors"
    g = torch.Generator().manual_seed(0)
    weightsmith.save({"a": torch.randn(64, generator=g), "b": torch.randn(64, generator=g)}, path)
    assert CliRunner().invoke(cli, ["check", str(path), "--verify"]).exit_code == 0
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # inside b's data: still a valid safetensors file
    path.write_bytes(bytes(data))
    weightsmith.open(path).load()
    result = CliRunner().invoke(cli, ["check", str(path), "--verify", "--json"])
    assert result.exit_code == 1, result.output
    assert list(json.loads(result.output)["verify"]["mismatched"]) == ["b"]
    assert os.path.exists(path)


def _tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    model = BertModel(config)
    with torch.no_grad():  # fresh zeros and ones are health findings; trained weights are not
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def test_a_hugging_face_folder_without_pickles_passes_check(tmp_path):
    # sharded safetensors from transformers' own writer: no pickle, so no globals; health still runs
    folder = tmp_path / "bert"
    _tiny_bert().save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").exists() and (folder / "config.json").exists()
    result = CliRunner().invoke(cli, ["check", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ok"] is True and "globals" not in data
    assert data["health"]["schema"] == "weightsmith.health/1"


def test_a_sharded_folder_weightsmith_wrote_passes_check(tmp_path):
    folder = tmp_path / "sharded"
    weightsmith.save(_tiny_bert(), folder, max_shard_size=20_000)
    result = CliRunner().invoke(cli, ["check", str(folder)])
    assert result.exit_code == 0, result.output


def test_a_folder_with_a_hostile_bin_shard_is_still_scanned(tmp_path):
    folder = tmp_path / "mixed"
    _tiny_bert().save_pretrained(folder, safe_serialization=True)
    marker = tmp_path / "MARKER"
    torch.save({"w": torch.zeros(2), "evil": _Payload(str(marker))}, folder / "extra.bin")
    result = CliRunner().invoke(cli, ["check", str(folder), "--json"])
    assert result.exit_code == 1, result.output
    assert "builtins.exec" in [g["name"] for g in json.loads(result.output)["globals"]["globals"]
                               if g["status"] == "refused"]
    assert not marker.exists()


def test_python_dash_m_check_exits_1_on_a_file_that_would_run_code(tmp_path):
    import subprocess
    import sys

    marker = tmp_path / "MARKER"
    path = tmp_path / "hostile.pt"
    torch.save({"w": torch.zeros(2), "evil": _Payload(str(marker))}, path)
    src = os.path.dirname(os.path.dirname(weightsmith.__file__))
    env = {**os.environ, "PYTHONPATH": src}
    proc = subprocess.run([sys.executable, "-m", "weightsmith", "check", str(path)], capture_output=True,
                          text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "UNSAFE" in proc.stdout
    assert not marker.exists()
