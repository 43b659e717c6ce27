"""`weightsmith plan`, `weightsmith warmstart`, and `inspect` of a model factory."""

import json
import sys

import pytest
import torch
from click.testing import CliRunner

import weightsmith
import weightsmith.examples
from weightsmith.cli import cli, main
from weightsmith.examples import model_a

FACTORY = "ws_cli_models:model_b"


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "ws_cli_models.py").write_text("from weightsmith.examples import model_b\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield
    sys.modules.pop("ws_cli_models", None)


@pytest.fixture
def source(tmp_path):
    torch.manual_seed(0)
    a = model_a()
    weightsmith.save({f"module.{k}": v for k, v in a.state_dict().items()}, tmp_path / "a.safetensors")
    return a, tmp_path / "a.safetensors"


def test_inspect_a_factory_shows_trainable_columns_without_allocating(factory_module):
    result = CliRunner().invoke(cli, ["inspect", FACTORY, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["schema"] == "weightsmith.summary/1"
    assert any(r["name"] == "classifier.weight" and r["device"] == "meta" for r in data["rows"])


def test_plan_prints_matches_and_exits_1_on_problems(factory_module, source, tmp_path):
    _, path = source
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rename]]\nsource = "head"\ntarget = "classifier"\n')
    ok = CliRunner().invoke(cli, ["plan", str(path), "--into", FACTORY, "--match", "auto", "--rules", str(rules),
                                  "--on-mismatch", "skip"])
    assert ok.exit_code == 0, ok.output
    assert "strip 'module.'" in ok.output and "ready: a strict load takes it" in ok.output
    bad = CliRunner().invoke(cli, ["plan", str(path), "--into", FACTORY, "--rules", str(rules), "--json"])
    assert bad.exit_code == 1
    problems = json.loads(bad.output)["problems"]
    assert any("classifier.weight" in p and "[3, 8]" in p and "[5, 8]" in p for p in problems)


@pytest.mark.parametrize("extra", [[], ["--match", "auto"], ["--no-strict"], ["--match", "auto", "--no-strict"],
                                   ["--on-mismatch", "skip", "--match", "auto"]])
def test_plan_exits_0_exactly_when_load_would_run_and_says_the_same(factory_module, source, extra):
    _, path = source
    result = CliRunner().invoke(cli, ["plan", str(path), "--into", FACTORY, "--json", *extra])
    data = json.loads(result.output)
    options = {"match": "auto" if "auto" in extra else "exact",
               "on_mismatch": "skip" if "skip" in extra else "error"}
    strict = "--no-strict" not in extra
    try:
        weightsmith.build(weightsmith.examples.model_b, path, strict=strict, **options)
        loads = True
    except weightsmith.PlanError:
        loads = False
    assert result.exit_code == (0 if loads else 1), result.output
    assert data["verdict"].startswith("ready" if loads else ("a strict load refuses" if strict
                                                             else "a load with strict=False refuses"))
    assert (data["refusals"] == []) == loads


def test_plan_of_a_factory_that_raises_is_one_line_and_exit_2(tmp_path, source, monkeypatch, capsys):
    _, path = source
    (tmp_path / "ws_cli_broken.py").write_text("def model(config):\n    return config\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(SystemExit) as exited:
            main(["plan", str(path), "--into", "ws_cli_broken:model"])
    finally:
        sys.modules.pop("ws_cli_broken", None)
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert exited.value.code == 2
    assert "building the target 'ws_cli_broken:model' failed: TypeError" in text
    assert "Traceback" not in text


def test_a_rename_rule_that_matches_nothing_is_an_error_or_with_a_flag_a_warning(factory_module, source, tmp_path):
    _, path = source
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rename]]\nsource = "conv1"\ntarget = "backbone_conv"\n'
                     '[[rename]]\nsource = "heads"\ntarget = "classifier"\n')
    args = ["plan", str(path), "--into", FACTORY, "--rules", str(rules), "--no-strict"]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 1
    assert "rename rule 2 (heads -> classifier) matches no source key; closest source names: head" in refused.output
    warned = CliRunner().invoke(cli, [*args, "--allow-unused-rules"])
    assert warned.exit_code == 0, warned.output
    assert "warning: rename rule 2 (heads -> classifier) matches no source key" in warned.output


def test_warmstart_writes_a_checkpoint_for_the_target_and_refuses_to_overwrite(factory_module, source, tmp_path):
    a, path = source
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"source": "conv1", "target": "backbone_conv"}]))
    out = tmp_path / "b.safetensors"
    args = ["warmstart", str(path), "--into", FACTORY, "-o", str(out), "--rules", str(rules),
            "--on-mismatch", "skip"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    b = weightsmith.open(out).load()
    assert torch.equal(b["backbone_conv.weight"], a.conv1.weight)
    assert b["classifier.weight"].shape == (5, 8)
    report = json.loads((tmp_path / "b.safetensors.report.json").read_text())
    assert report["provenance"]["backbone_conv.weight"] == "module.conv1.weight"
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 2 and "--force" in again.output


def test_warmstart_into_a_checkpoint_keeps_its_own_values_where_the_source_has_none(source, tmp_path):
    a, path = source
    target = tmp_path / "target.safetensors"
    weightsmith.save({"fc.weight": torch.zeros(8, 8), "extra": torch.full((2,), 7.0)}, target)
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(cli, ["warmstart", str(path), "--into", str(target), "-o", str(out),
                                      "--match", "exact"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    got = weightsmith.open(out).load()
    assert torch.equal(got["fc.weight"], a.fc.weight)
    assert torch.equal(got["extra"], torch.full((2,), 7.0))


def test_plan_and_warmstart_share_one_declaration_of_their_plan_options():
    from weightsmith.cli.plan import command as plan_command
    from weightsmith.cli.warmstart import command as warmstart_command

    shared = {"target", "rules", "match", "exact", "on_mismatch", "allow_unused_rules"}

    def options(command):
        return {p.name: p for p in command.params if p.name in shared}

    plan_opts, warm_opts = options(plan_command), options(warmstart_command)
    assert set(plan_opts) == set(warm_opts) == shared
    for name in shared:
        a, b = plan_opts[name], warm_opts[name]
        same = (a.opts, a.default, a.help, a.type.to_info_dict()) == (b.opts, b.default, b.help, b.type.to_info_dict())
        assert same, name
