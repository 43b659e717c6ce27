"""`weightsmith merge`: arguments, --config (TOML and mergekit YAML), --dry-run and exit codes."""

import json

import pytest
import torch
from click.testing import CliRunner

import weightsmith as ws
from weightsmith.cli import cli


def _state(seed, prefix=""):
    g = torch.Generator().manual_seed(seed)
    s = {"embed.weight": torch.randn(6, 4, generator=g)}
    for i in range(3):
        s[f"layers.{i}.self_attn.weight"] = torch.randn(4, 4, generator=g)
        s[f"layers.{i}.mlp.weight"] = torch.randn(4, 4, generator=g)
    return {prefix + k: v for k, v in s.items()}


@pytest.fixture
def models(tmp_path):
    paths = {}
    for name, seed, prefix in [("base", 0, ""), ("a", 1, "module."), ("b", 2, "")]:
        paths[name] = tmp_path / f"{name}.safetensors"
        ws.save(_state(seed, prefix), paths[name])
    return paths


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_merge_ties_from_arguments(models, tmp_path):
    out = tmp_path / "out.safetensors"
    r = _run("merge", models["a"], models["b"], "-o", out, "--method", "ties", "--base", models["base"],
             "--weights", "0.5,0.5", "--density", "0.5", "--dtype", "bfloat16", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["schema"] == "weightsmith.merge/1" and report["method"] == "ties"
    assert ws.open(out)["layers.0.mlp.weight"].dtype == "bfloat16"


def test_an_existing_output_needs_force(models, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep")
    r = _run("merge", models["a"], models["b"], "-o", out)
    assert r.exit_code == 2 and "--force" in r.output and out.read_bytes() == b"keep"
    assert _run("merge", models["a"], models["b"], "-o", out, "--force").exit_code == 0
    assert out.read_bytes() != b"keep"


def test_dry_run_prints_the_plan_and_writes_nothing(models, tmp_path):
    out = tmp_path / "out.safetensors"
    r = _run("merge", models["a"], models["b"], "-o", out, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "merge plan: linear" in r.output and "strip 'module.'" in r.output
    assert not out.exists()


def test_plan_problems_exit_1_and_errors_exit_2(models, tmp_path):
    r = _run("merge", models["a"], models["b"], "-o", tmp_path / "o.safetensors", "--method", "ties",
             "--density", "0.5")
    assert r.exit_code == 1
    assert "ties needs a base model" in r.output
    assert not (tmp_path / "o.safetensors").exists()
    r = _run("merge", models["a"], tmp_path / "missing.safetensors", "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 2


def test_toml_config(models, tmp_path):
    (tmp_path / "merge.toml").write_text(
        'method = "slerp"\nbase = "base.safetensors"\nsources = ["b.safetensors"]\nout = "s.safetensors"\n'
        '[parameters]\nt = [["**.self_attn.**", [0.0, 1.0]], ["**", 0.5]]\n')
    r = _run("merge", "--config", tmp_path / "merge.toml")
    assert r.exit_code == 0, r.output
    got = ws.open(tmp_path / "s.safetensors").load()
    base, b = _state(0), _state(2)
    torch.testing.assert_close(got["layers.0.self_attn.weight"], base["layers.0.self_attn.weight"])
    torch.testing.assert_close(got["layers.2.self_attn.weight"], b["layers.2.self_attn.weight"])


def test_mergekit_yaml_ties(models, tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "ties.yml").write_text(f"""
models:
  - model: {models['base']}
  - model: {models['a']}
    parameters: {{density: 0.5, weight: 0.7}}
  - model: {models['b']}
    parameters: {{density: 0.3, weight: 0.3}}
merge_method: ties
base_model: {models['base']}
parameters:
  normalize: true
  int8_mask: true
dtype: float32
""")
    out = tmp_path / "k.safetensors"
    r = _run("merge", "--config", tmp_path / "ties.yml", "-o", out)
    assert r.exit_code == 0, r.output
    direct = tmp_path / "d.safetensors"
    ws.merge([models["a"], models["b"]], direct, method="ties", base=models["base"], weights=[0.7, 0.3],
             densities=[0.5, 0.3])
    a, b = ws.open(out).load(), ws.open(direct).load()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_mergekit_yaml_slerp_with_filters(models, tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "slerp.yml").write_text(f"""
slices:
  - sources:
      - model: {models['base']}
        layer_range: [0, 3]
      - model: {models['b']}
        layer_range: [0, 3]
merge_method: slerp
base_model: {models['base']}
parameters:
  t:
    - filter: self_attn
      value: [0, 1]
    - value: 0.5
dtype: float32
""")
    r = _run("merge", "--config", tmp_path / "slerp.yml", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output[r.output.index("{"):])
    t = {s["key"]: s["params"]["t"] for s in plan["steps"]}
    assert t["layers.0.self_attn.weight"] == 0.0 and t["layers.2.self_attn.weight"] == 1.0
    assert t["layers.1.mlp.weight"] == 0.5


def test_mergekit_yaml_passthrough_slices(models, tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "frank.yml").write_text(f"""
slices:
  - sources:
      - model: {models['base']}
        layer_range: [0, 2]
  - sources:
      - model: {models['b']}
        layer_range: [1, 3]
merge_method: passthrough
dtype: float32
""")
    out = tmp_path / "f.safetensors"
    r = _run("merge", "--config", tmp_path / "frank.yml", "-o", out)
    assert r.exit_code == 0, r.output
    got = ws.open(out).load()
    assert torch.equal(got["layers.3.mlp.weight"], _state(2)["layers.2.mlp.weight"])
    assert torch.equal(got["layers.1.mlp.weight"], _state(0)["layers.1.mlp.weight"])


def test_mergekit_yaml_with_a_hub_name_is_refused(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "hub.yml").write_text("models:\n  - model: org/some-model\nmerge_method: linear\n")
    r = _run("merge", "--config", tmp_path / "hub.yml", "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 2
    assert "not a local path" in r.output
