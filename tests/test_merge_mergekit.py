"""The same mergekit YAML through mergekit and through weightsmith gives the same tensors.

Runs only where mergekit is importable (it is not a test dependency: it pins its own
transformers and datasets); e.g. ``pip install --target DIR mergekit immutables --no-deps`` and
``PYTHONPATH=DIR``. DARE is left out: mergekit draws its masks from torch's global generator and
rescales by the L1 norm, so its DARE results differ by design.
"""

import os
import subprocess
import sys

import pytest
import torch

import weightsmith as ws

pytest.importorskip("mergekit")
transformers = pytest.importorskip("transformers")

CONFIGS = {
    "linear": """
models:
  - {{model: {ft0}, parameters: {{weight: 0.6}}}}
  - {{model: {ft1}, parameters: {{weight: 0.3}}}}
merge_method: linear
dtype: float32
""",
    "task_arithmetic": """
models:
  - {{model: {ft0}, parameters: {{weight: 0.6}}}}
  - {{model: {ft1}, parameters: {{weight: -0.3}}}}
merge_method: task_arithmetic
base_model: {base}
parameters: {{lambda: 0.8}}
dtype: float32
""",
    "ties": """
models:
  - {{model: {ft0}, parameters: {{density: 0.4, weight: [0.2, 0.9]}}}}
  - {{model: {ft1}, parameters: {{density: 0.6, weight: 0.5}}}}
merge_method: ties
base_model: {base}
dtype: float32
""",
    "slerp": """
slices:
  - sources:
      - {{model: {base}, layer_range: [0, 3]}}
      - {{model: {ft0}, layer_range: [0, 3]}}
merge_method: slerp
base_model: {base}
parameters:
  t:
    - {{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}}
    - {{filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}}
    - {{value: 0.5}}
dtype: float32
""",
    "model_stock": """
models:
  - {{model: {ft0}}}
  - {{model: {ft1}}}
merge_method: model_stock
base_model: {base}
dtype: float32
""",
}


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    for i in range(2):
        with torch.no_grad():
            tuned = transformers.LlamaForCausalLM(cfg)
            tuned.load_state_dict(base.state_dict())
            for p in tuned.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        tuned.save_pretrained(root / f"ft{i}")
    return root


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_same_tensors_as_mergekit(llamas, tmp_path, method):
    config = tmp_path / f"{method}.yml"
    config.write_text(CONFIGS[method].format(base=llamas / "base", ft0=llamas / "ft0", ft1=llamas / "ft1"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", str(config), str(tmp_path / "mk")],
                   env=env, capture_output=True, timeout=600)  # it may fail on tokenizers after writing
    theirs = ws.open(tmp_path / "mk" / "model.safetensors").load()
    from weightsmith.merging.config import read_config

    cfg = read_config(config)
    ws.merge(cfg.sources, tmp_path / "ws.safetensors", method=cfg.method, base=cfg.base, weights=cfg.weights,
             dtype=cfg.dtype, **cfg.params)
    ours = ws.open(tmp_path / "ws.safetensors").load()
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6, msg=k)
