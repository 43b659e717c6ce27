"""The two entry points and TARGET factories: exit codes, one-line errors, configs and ``--kw``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weightsmith.cli import main

# the console script is `weightsmith = "weightsmith.cli:main"`: this is what it runs
_CONSOLE = "import sys; from weightsmith.cli import main; sys.exit(main())"


def _both(*args: str, cwd: Path | None = None) -> list[subprocess.CompletedProcess[str]]:
    env = {**os.environ, "COLUMNS": "200"}
    return [subprocess.run([sys.executable, *entry, *args], capture_output=True, text=True, env=env,
                           timeout=120, cwd=cwd)
            for entry in (["-m", "weightsmith"], ["-c", _CONSOLE])]


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return int(code or 0), out, err


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    torch.manual_seed(0)
    a, b, bad = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "bad.safetensors"
    w = torch.randn(4, 3)
    save_file({"w": w}, str(a))
    save_file({"w": w + 1}, str(b))
    save_file({"w": torch.tensor([1.0, float("nan")])}, str(bad))
    return a, b, bad


def test_both_entry_points_give_the_same_exit_codes(pair: tuple[Path, Path, Path]) -> None:
    a, b, _ = pair
    codes = [r.returncode for r in _both("diff", str(a), str(b))]  # runpy below covers the other codes
    assert codes == [1, 1]


def test_python_m_exits_with_main_s_code(pair: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    import runpy

    a, b, bad = pair
    cases = {("diff", str(a), str(a)): 0, ("diff", str(a), str(b)): 1, ("check", str(bad)): 1,
             ("check", str(a), "--ignore", "nope"): 2}
    for args, expected in cases.items():
        monkeypatch.setattr(sys, "argv", ["weightsmith", *args])
        with pytest.raises(SystemExit) as e:
            runpy.run_module("weightsmith", run_name="__main__")
        assert (e.value.code or 0) == expected == _main(capsys, *args)[0], args


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "my_factories.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def make(width=4, act="relu", bias=True):
            assert act in ("relu", "gelu"), f"unknown act {act!r}"
            return nn.Sequential(nn.Linear(3, width, bias=bias), nn.ReLU())

        def broken():
            raise KeyError("no such layer")
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_failing_factory_is_one_line_and_exit_2(factories: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _main(capsys, "inspect", "my_factories:broken")
    assert code == 2
    assert err == ("error: building the target 'my_factories:broken' failed: KeyError: 'no such layer'\n")
    with pytest.raises(Exception, match="no such layer"):
        main(["--debug", "inspect", "my_factories:broken"])


def test_a_factory_module_that_fails_to_import_is_one_line(factories: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    (factories / "broken_module.py").write_text("def make(:\n")
    code, _, err = _main(capsys, "inspect", "broken_module:make")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: cannot import 'broken_module' for target 'broken_module:make': SyntaxError")


def test_a_class_needing_arguments_says_to_pass_kw(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _main(capsys, "inspect", "torch.nn:Linear")
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "missing 2 required positional arguments" in err and "--kw NAME=VALUE" in err


def test_kw_values_are_literals_and_never_run(factories: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _main(capsys, "inspect", "my_factories:make", "--kw", "width=7", "--kw", "bias=False",
                         "--kw", "act=gelu", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)["rows"]}
    assert list(rows) == ["0.weight"] and rows["0.weight"]["shape"] == [7, 3]
    marker = factories / "ran"
    code, _, err = _main(capsys, "inspect", "my_factories:make",
                         "--kw", f"act=__import__('pathlib').Path({str(marker)!r}).touch()")
    assert code == 2 and "unknown act" in err
    assert not marker.exists()


def test_kw_must_be_name_equals_value(factories: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _main(capsys, "inspect", "my_factories:make", "--kw", "7")
    assert (code, err) == (2, "error: --kw '7': write NAME=VALUE, NAME a Python identifier (e.g. --kw hidden=256)\n")


def test_transformers_class_takes_the_config_beside_the_checkpoint(
        minilm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    code, out, err = _main(capsys, "plan", str(minilm_dir / "model.safetensors"),
                           "--into", "transformers:BertForMaskedLM")
    assert code in (0, 1) and err == ""  # built from config.json; the plan's verdict is the plan's business
    assert "cls.predictions" in out


def test_the_default_config_is_beside_a_file_or_in_a_folder(minilm_dir: Path) -> None:
    from weightsmith.cli._target import _config_path

    config = minilm_dir / "config.json"
    assert _config_path("t", None, minilm_dir) == config
    assert _config_path("t", None, minilm_dir / "model.safetensors") == config
    assert _config_path("t", minilm_dir, None) == config


def test_transformers_class_without_config_asks_for_one(
        minilm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    lone = tmp_path / "model.safetensors"
    lone.symlink_to(minilm_dir / "model.safetensors")
    code, _, err = _main(capsys, "plan", str(lone), "--into", "transformers:BertModel")
    assert (code, err) == (2, f"error: transformers:BertModel is built from a config, and there is no config.json "
                              f"beside {lone}: pass --config PATH (a config.json or the model folder)\n")
    code, out, err = _main(capsys, "plan", str(lone), "--into", "transformers:BertModel",
                           "--config", str(minilm_dir / "config.json"), "--kw", "num_hidden_layers=2")
    assert code in (0, 1) and err == ""  # two layers built: the other four are unused source keys
    assert "encoder.layer.5.output.dense.weight" in out


def test_hints_show_cli_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "src.safetensors", tmp_path / "dst.safetensors"
    save_file({"w": torch.zeros(3, 2)}, str(src))
    save_file({"w": torch.zeros(4, 2)}, str(dst))
    code, out, _ = _main(capsys, "plan", str(src), "--into", str(dst))
    assert code == 1
    assert "(pass --on-mismatch skip or adapt for this key)" in out and "on_mismatch=" not in out
    code, _, err = _main(capsys, "inspect", str(src), "--filter", "x")
    assert (code, err) == (2, "error: selector 'x' matched nothing among 1 names (e.g. w); check the spelling\n")


def test_warmstart_says_which_file_it_wrote(factories: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import weightsmith as ws
    from my_factories import make

    src = tmp_path / "src.safetensors"
    ws.save(make(), src)
    out = tmp_path / "out.safetensors"
    code, stdout, stderr = _main(capsys, "warmstart", str(src), "--into", "my_factories:make", "-o", str(out))
    assert code == 0, stderr
    assert stdout.rstrip().splitlines()[-1] == f"wrote {out} and {out}.report.json"
    out.unlink()
    code, stdout, stderr = _main(capsys, "warmstart", str(src), "--into", "my_factories:make", "-o", str(out),
                                 "--json")
    assert json.loads(stdout)["schema"] == "weightsmith.load/1"
    assert stderr == f"wrote {out} and {out}.report.json\n"
