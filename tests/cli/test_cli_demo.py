"""`weightsmith demo` runs end to end and writes the files it talks about."""

from click.testing import CliRunner

import weightsmith
from weightsmith.cli import cli


def test_demo_runs_and_writes_readable_checkpoints(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "demo complete" in result.output
    tied = weightsmith.open(tmp_path / "tied.safetensors")
    assert ("2.weight", "4.weight") in tied.ties
    assert len(weightsmith.open(tmp_path / "tied-sharded")) == 8


def test_make_demo_installs_only_the_package_and_its_report_extra():
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    dry = subprocess.run(["make", "-n", "-B", "demo"], cwd=root, capture_output=True, text=True, timeout=60)
    if dry.returncode != 0:
        import pytest

        pytest.skip(f"make is not usable here: {dry.stderr.strip()[:200]}")
    installs = [line for line in dry.stdout.splitlines() if "pip install" in line]
    assert any('-e ".[report]"' in line for line in installs), dry.stdout
    assert not any("[test]" in line or "hypothesis" in line or "transformers" in line for line in installs)
