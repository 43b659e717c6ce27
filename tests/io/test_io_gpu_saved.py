"""S15: a checkpoint saved from GPU tensors loads on a CPU-only machine (map_location semantics)."""

import pytest
import torch

import weightsmith


@pytest.fixture
def gpu_saved(tmp_path, monkeypatch):
    # what torch.save writes for CUDA tensors: the same bytes, with "cuda:0" as each storage location
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    state = {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), "b": torch.arange(3.0)}
    torch.save(state, tmp_path / "gpu.pt")
    monkeypatch.undo()
    return tmp_path / "gpu.pt", state


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_torch_load_without_map_location_refuses_it(gpu_saved):
    path, _ = gpu_saved
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)


def test_weightsmith_loads_a_gpu_saved_file_on_the_cpu(gpu_saved):
    path, state = gpu_saved
    loaded = weightsmith.open(path).load(device="cpu")
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert loaded[key].device.type == "cpu"
        assert torch.equal(loaded[key], value)


def test_a_model_warm_starts_from_a_gpu_saved_file(gpu_saved):
    path, state = gpu_saved
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(4, 3))
    model.b = torch.nn.Parameter(torch.zeros(3))
    weightsmith.load_(model, path)
    assert torch.equal(model.w, state["w"]) and torch.equal(model.b, state["b"])
