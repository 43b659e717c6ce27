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
