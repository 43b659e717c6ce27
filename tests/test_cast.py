import json

import pytest
import torch
from torch import nn

from weightsmith import ModelError, SelectorError, cast_


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)
    )


def test_cast_to_half_keeps_norms_in_float32_s24():
    model = net()
    params = {name: p for name, p in model.named_parameters()}
    old = {k: v.clone() for k, v in model.state_dict().items()}

    report = cast_(model, torch.float16)

    for name, p in model.named_parameters():
        assert p is params[name]
        want = torch.float32 if name[0] in "13" else torch.float16
        assert p.dtype == want, name
        assert torch.equal(p, old[name].to(want))
    assert model[3].running_mean.dtype == torch.float32
    assert model[3].num_batches_tracked.dtype == torch.int64
    assert [n for n, _ in report.cast] == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert ("1.weight", "norm layer") in report.kept
    assert ("3.num_batches_tracked", "int64 is not floating point") in report.kept


def test_cast_a_selected_subset_by_dtype_name():
    model = net()
    report = cast_(model, "bfloat16", select="2.*")
    assert model[2].weight.dtype == torch.bfloat16
    assert model[0].weight.dtype == torch.float32 and model[4].weight.dtype == torch.float32
    assert report.dtype == "bfloat16"
    assert json.loads(report.to_json())["schema"] == "weightsmith.cast/1"
    assert "float32 → bfloat16" in str(report)


def test_norms_are_cast_too_when_asked_but_integers_never():
    model = net()
    cast_(model, torch.float16, keep_norms=False)
    assert model[1].weight.dtype == torch.float16
    assert model[3].running_var.dtype == torch.float16
    assert model[3].num_batches_tracked.dtype == torch.int64


def test_norm_classes_of_other_libraries_are_recognised_by_name():
    class LlamaRMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

    model = nn.Sequential(nn.Linear(8, 8), LlamaRMSNorm(), nn.RMSNorm(8))
    cast_(model, torch.float16)
    assert model[0].weight.dtype == torch.float16
    assert model[1].weight.dtype == torch.float32 and model[2].weight.dtype == torch.float32


def test_ties_survive_a_cast():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(nn.Linear(4, 8), shared, nn.ReLU(), shared)
    report = cast_(model, torch.float16, select="1.*")
    assert model[1].weight is model[3].weight
    assert model[3].weight.dtype == torch.float16
    assert {n for n, _ in report.cast} == {"1.weight", "1.bias", "3.weight", "3.bias"}
    assert model[0].weight.dtype == torch.float32


def test_gradients_are_cast_along_and_training_goes_on():
    model = nn.Linear(4, 2)
    model(torch.ones(1, 4)).sum().backward()
    cast_(model, torch.float64)
    assert model.weight.grad.dtype == torch.float64
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    model(torch.ones(1, 4, dtype=torch.float64)).sum().backward()
    opt.step()
    assert not torch.equal(model.weight, before)


def test_selected_buffers_are_cast():
    model = nn.Linear(2, 2)
    model.register_buffer("scale", torch.ones(2))
    buffer = model.scale
    cast_(model, torch.float16, select="scale")
    assert model.scale.dtype == torch.float16 and model.scale is buffer
    assert model.weight.dtype == torch.float32


def test_bad_arguments():
    with pytest.raises(ModelError, match="not a floating-point"):
        cast_(net(), torch.int8)
    with pytest.raises(ModelError, match="unknown dtype"):
        cast_(net(), "float17")
    with pytest.raises(SelectorError):
        cast_(net(), torch.float16, select="head.*")


def test_a_failing_cast_puts_every_tensor_back(monkeypatch):
    model = net()
    old = {k: (v.dtype, v.clone()) for k, v in model.state_dict().items()}
    real_to = torch.Tensor.to
    calls = []

    def failing_to(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", failing_to)
    with pytest.raises(ModelError, match="put back"):
        cast_(model, torch.float16)
    monkeypatch.undo()
    for k, v in model.state_dict().items():
        assert v.dtype == old[k][0] and torch.equal(v, old[k][1]), k
