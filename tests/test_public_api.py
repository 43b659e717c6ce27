"""The curated public API: every exported name resolves, and errors share one base."""

import subprocess
import sys

import pytest

import weightsmith


@pytest.mark.parametrize("name", weightsmith.__all__)
def test_every_exported_name_resolves(name):
    assert getattr(weightsmith, name) is not None


def test_errors_derive_from_one_base():
    errors = [getattr(weightsmith, n) for n in weightsmith.__all__ if n.endswith("Error")]
    assert len(errors) >= 10
    assert all(issubclass(e, weightsmith.WeightsmithError) for e in errors)
    assert issubclass(weightsmith.CheckpointNotFoundError, FileNotFoundError)


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError):
        weightsmith.no_such_function  # noqa: B018


def test_import_does_not_pull_torch():
    code = "import sys, weightsmith; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "weightsmith", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "inspect" in out.stdout
