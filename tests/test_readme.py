"""The README's live-model walkthrough runs as written (so the docs cannot drift from the API)."""

from pathlib import Path

import weightsmith
from weightsmith.examples import mlp

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block(starting_with: str) -> str:
    text = README.read_text()
    start = text.index("```python\n" + starting_with) + len("```python\n")
    return text[start:text.index("```", start)]


def test_the_live_model_walkthrough_runs(tmp_path, monkeypatch):
    code = _python_block("import torch\nfrom torch import nn\nimport weightsmith as ws")
    monkeypatch.chdir(tmp_path)
    weightsmith.save(mlp(), "model.safetensors")  # the file the snippet checks
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    model = namespace["model"]
    assert all(p.dtype.is_floating_point for p in model.parameters())
    assert namespace["snap"] is not None and namespace["opt"].param_groups
