"""`weightsmith diff A B`: exit 0 equal, 1 different, 2 on error; JSON schema weightsmith.diff/1."""

import json

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from weightsmith.cli import cli


def run(*args):
    return CliRunner().invoke(cli, ["diff", *map(str, args)])


@pytest.fixture
def files(tmp_path, mlp):
    state = {k: v.contiguous() for k, v in mlp.state_dict().items()}
    save_file(state, str(tmp_path / "a.safetensors"))
    save_file(state, str(tmp_path / "same.safetensors"))
    changed = {**state, "2.weight": state["2.weight"] + 0.5}
    save_file(changed, str(tmp_path / "b.safetensors"))
    renamed = {k.replace("2.", "head.", 1) if k.startswith("2.") else k: v for k, v in state.items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    return tmp_path


def test_identical_files_exit_0(files):
    result = run(files / "a.safetensors", files / "same.safetensors")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "equal: 4 tensors identical"


def test_a_changed_tensor_exits_1_and_is_named(files):
    result = run(files / "a.safetensors", files / "b.safetensors")
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[0] == "different: 1 of 4 compared tensors changed"
    rows = [line for line in result.output.splitlines() if "2.weight" in line]
    assert len(rows) == 1 and "0.5" in rows[0] and "100.00%" in rows[0]


def test_json_follows_the_schema(files):
    result = run(files / "a.safetensors", files / "b.safetensors", "--json")
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["schema"] == "weightsmith.diff/1" and data["equal"] is False
    assert {"a", "b", "only_a", "only_b", "shape_changes", "dtype_changes", "tensors", "layers",
            "modules", "atol", "rtol"} <= set(data)
    changed = [t for t in data["tensors"] if t["changed"]]
    assert [t["key"] for t in changed] == ["2.weight"]
    assert changed[0]["max_abs"] == pytest.approx(0.5) and changed[0]["method"] == "compared"


def test_tolerance_and_rules_make_files_equal(files, tmp_path):
    assert run(files / "a.safetensors", files / "b.safetensors", "--atol", "0.6").exit_code == 0
    assert run(files / "a.safetensors", files / "renamed.safetensors").exit_code == 1
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"source": "2", "target": "head"}]))
    assert run(files / "a.safetensors", files / "renamed.safetensors", "--rules", rules).exit_code == 0


def test_quiet_prints_only_the_summary_and_top_limits_rows(files):
    quiet = run(files / "a.safetensors", files / "b.safetensors", "--quiet")
    assert quiet.exit_code == 1 and quiet.output == "different: 1 of 4 compared tensors changed\n"
    none = run(files / "a.safetensors", files / "b.safetensors", "--top", "0")
    assert "2.weight" not in none.output and "most changed tensors (0 of 1" in none.output


def test_errors_exit_2(files, tmp_path):
    missing = run(files / "a.safetensors", tmp_path / "nope.safetensors")
    assert missing.exit_code == 2 and "error:" in missing.output and "nope.safetensors" in missing.output
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint at all")
    assert run(files / "a.safetensors", garbage).exit_code == 2
    assert run(files / "a.safetensors", files / "b.safetensors", "--atol", "-1").exit_code == 2


@pytest.fixture
def layered(tmp_path):
    import torch

    torch.manual_seed(0)
    a = {f"encoder.layer.{i}.{m}.{p}": torch.randn(16, 16) if p == "weight" else torch.randn(16)
         for i in range(8) for m in ("query", "out") for p in ("weight", "bias")}
    a["encoder.layer.5.out.bias"] = torch.zeros(16)  # a bias that starts at zero
    a["position_ids"] = torch.arange(16)
    b = {k: v.clone() for k, v in a.items()}
    b["encoder.layer.5.query.weight"] += 0.3 * torch.randn(16, 16)
    b["encoder.layer.5.out.bias"] += 0.01  # relative change: inf
    b["encoder.layer.2.query.bias"] *= 1.0 + 1e-3  # barely moved
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    c = {k: v for k, v in a.items() if k != "position_ids"}  # the same weights without the buffer
    save_file(c, str(tmp_path / "c.safetensors"))
    return tmp_path


def test_rollup_keeps_layer_indices_and_the_ranking_is_by_score(layered):
    from weightsmith.comparison import diff

    d = diff(layered / "a.safetensors", layered / "b.safetensors")
    changed = [r.name for r in d.blocks if r.changed_tensors]
    assert changed == ["encoder.layer.2", "encoder.layer.5"]
    assert sorted(r.name for r in d.blocks) == [*(f"encoder.layer.{i}" for i in range(8)), "position_ids"]
    ranked = [t.key for t in d.most_changed()]
    assert ranked[0] == "encoder.layer.5.query.weight"  # the real change first
    assert ranked[-1] == "encoder.layer.2.query.bias"
    zero = next(t for t in d.tensors if t.key == "encoder.layer.5.out.bias")
    assert zero.rel_l2 == float("inf") and 0 < zero.score < 1  # absolute fallback: finite
    result = run(layered / "a.safetensors", layered / "b.safetensors")
    assert result.exit_code == 1
    block_rows = [line for line in result.output.splitlines() if line.startswith("│ encoder.layer.5 ")]
    assert len(block_rows) == 1 and "per block (indices kept)" in result.output


def test_select_and_exclude(layered):
    a, c = layered / "a.safetensors", layered / "c.safetensors"
    assert run(a, c).exit_code == 1  # one buffer only in a
    result = run(a, c, "--exclude", "position_ids")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "equal: 32 tensors identical"
    only = run(layered / "a.safetensors", layered / "b.safetensors", "--select", "query", "--exclude", "bias")
    assert only.output.splitlines()[0] == "different: 1 of 8 compared tensors changed"
    typo = run(a, c, "--select", "encoder.layer.*.qeury")
    assert typo.exit_code == 2
    assert typo.output.startswith("error: selector 'encoder.layer.*.qeury' matched nothing among 33 names "
                                  "(closest keys: ")
    assert "allow_empty" not in typo.output and typo.output.rstrip().endswith("check the spelling")
