"""build: new keys are initialized by the model's own `_init_weights` where it has one (as
transformers' from_pretrained does), else by `reset_parameters`, and the plan and report say which."""

import torch
from torch import nn

import weightsmith as ws


class Gain(nn.Module):
    """A parameter no initializer knows: no reset_parameters, not covered by _init_weights."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))


class OwnInit(nn.Module):
    """A model with its own _init_weights for Linear only (as a PreTrainedModel has)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.extra = Gain()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            module.weight.data.fill_(0.5)
            module.bias.data.zero_()


def test_new_keys_get_the_models_own_init_then_reset_parameters_then_zeros(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "body.safetensors"
    ws.save({"body.weight": torch.randn(4, 4), "body.bias": torch.randn(4)}, path)

    model, report = ws.build(OwnInit, path, strict=False, min_coverage=0.0)

    assert torch.equal(model.head.weight, torch.full((3, 4), 0.5)) and torch.equal(model.head.bias, torch.zeros(3))
    assert report.provenance["head.weight"] == "_init_weights"
    # not covered by _init_weights: the module's reset_parameters, and the report says so
    assert torch.equal(model.norm.weight, torch.ones(3))
    assert report.provenance["norm.weight"].startswith("reset_parameters")
    # neither: zeros, said so
    assert torch.equal(model.extra.gain, torch.zeros(4))
    assert report.provenance["extra.gain"].startswith("zeros")
    assert not any(t.isnan().any() for t in model.parameters())


def test_the_plan_of_a_model_on_meta_names_its_own_init():
    with torch.device("meta"):
        model = OwnInit()
    p = ws.plan(model, {"body.weight": torch.zeros(4, 4), "body.bias": torch.zeros(4)})
    fills = {s.target: s.fill for s in p.missing}
    assert fills["head.weight"] == "_init_weights"
    with torch.device("meta"):
        plain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    p = ws.plan(plain, {"0.weight": torch.zeros(4, 4), "0.bias": torch.zeros(4)})
    assert {s.target: s.fill for s in p.missing}["1.weight"] == "reset_parameters"
