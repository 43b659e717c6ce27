import pytest
import torch
from torch import nn

import weightsmith as ws
from weightsmith.errors import ModelError, SelectorError
from weightsmith.freeze import freeze_
from weightsmith.groups import GroupsReport, ParamGroups, param_groups


class Tiny(nn.Module):
    """Transformer-like: embeddings, numbered layers, a final norm and a head."""

    def __init__(self, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"fc": nn.Linear(8, 8), "norm": nn.LayerNorm(8)}) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for layer in self.layers:
            x = layer["norm"](x + torch.relu(layer["fc"](x)))
        return self.head(self.norm(x))


def by_name(groups: list[dict]) -> dict[str, tuple[float, float]]:
    return {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["param_names"]}


def unique_trainable(model: nn.Module) -> int:
    return len({id(p) for p in model.parameters() if p.requires_grad})


def test_s22_low_rate_for_pretrained_layers_high_for_the_new_head():
    torch.manual_seed(0)
    model = Tiny()
    groups = param_groups(model, lr=1e-5, rules=[("head", {"lr": 1e-3})], no_decay=None)
    table = by_name(groups)
    assert table["head.weight"] == (1e-3, 0.0) and table["head.bias"] == (1e-3, 0.0)
    assert {lr for n, (lr, _) in table.items() if not n.startswith("head")} == {1e-5}
    assert len(groups) == 2  # equal options merged
    assert ws.param_groups is param_groups


def test_no_decay_on_biases_norms_and_1d_tensors_and_embeddings_only_when_asked():
    model = Tiny()
    model.scale = nn.Parameter(torch.ones(8))  # a 1-D parameter outside any norm
    table = by_name(param_groups(model, lr=1e-3, weight_decay=0.05))
    decayed = sorted(n for n, (_, wd) in table.items() if wd == 0.05)
    assert decayed == ["embed.weight", "head.weight"] + [f"layers.{i}.fc.weight" for i in range(4)]
    assert table["layers.0.norm.weight"][1] == 0.0 and table["scale"][1] == 0.0
    table = by_name(param_groups(model, lr=1e-3, weight_decay=0.05, no_decay_embeddings=True))
    assert table["embed.weight"][1] == 0.0


def test_no_decay_on_batchnorm_weights_and_by_selector_or_none():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    table = by_name(param_groups(model, lr=0.1, weight_decay=0.01))
    assert table == {"0.weight": (0.1, 0.01), "0.bias": (0.1, 0.0), "1.weight": (0.1, 0.0),
                     "1.bias": (0.1, 0.0), "2.weight": (0.1, 0.01), "2.bias": (0.1, 0.0)}
    table = by_name(param_groups(model, lr=0.1, weight_decay=0.01, no_decay="2"))
    assert [n for n, (_, wd) in table.items() if wd == 0.0] == ["2.weight", "2.bias"]
    table = by_name(param_groups(model, lr=0.1, weight_decay=0.01, no_decay=None))
    assert all(wd == 0.01 for _, wd in table.values())


def test_layer_wise_decay_on_layers_0_to_3():
    model = Tiny()
    table = by_name(param_groups(model, lr=1.0, layer_decay=0.5))
    assert table["embed.weight"][0] == 0.5 ** 5
    assert [table[f"layers.{i}.fc.weight"][0] for i in range(4)] == [0.5 ** 4, 0.5 ** 3, 0.5 ** 2, 0.5]
    assert table["layers.2.norm.bias"][0] == 0.25
    assert table["norm.weight"][0] == 1.0 and table["head.weight"][0] == 1.0


def test_layer_decay_combines_with_lr_mult_while_absolute_lr_replaces_it():
    model = Tiny()
    groups = param_groups(model, lr=1.0, layer_decay=0.5,
                          rules=[("layers.3", {"lr_mult": 4}), ("layers.0", {"lr": 0.3})])
    table = by_name(groups)
    assert table["layers.3.fc.weight"][0] == 2.0
    assert table["layers.0.fc.weight"][0] == 0.3


def test_layer_id_function_sets_the_depth():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1))
    table = by_name(param_groups(model, lr=1.0, layer_decay=0.1, layer_id=lambda n: int(n[0])))
    assert table["2.weight"][0] == 1.0
    assert table["1.bias"][0] == pytest.approx(0.1)
    assert table["0.weight"][0] == pytest.approx(0.01)


def test_first_matching_rule_wins():
    model = Tiny()
    table = by_name(param_groups(model, lr=1.0, weight_decay=0.1, rules=[
        ("head.weight", {"lr": 5.0, "weight_decay": 0.2}),
        ("head", {"lr": 3.0}),
    ]))
    assert table["head.weight"] == (5.0, 0.2)
    assert table["head.bias"] == (3.0, 0.0)  # no decay on biases wins over the rules


def test_groups_feed_adamw_directly_cover_each_trainable_parameter_once_and_step():
    torch.manual_seed(0)
    model = Tiny()
    tied = nn.Linear(8, 8)
    model.layers[1]["fc"] = tied
    model.layers[2]["fc"] = tied  # one Parameter under two names
    freeze_(model, "layers.0")
    groups = param_groups(model, lr=1e-2, weight_decay=0.1, layer_decay=0.8,
                          rules=[("head", {"lr_mult": 10})])
    assert isinstance(groups, ParamGroups) and isinstance(groups, list)
    assert sum(len(g["params"]) for g in groups) == unique_trainable(model)
    names = [n for g in groups for n in g["param_names"]]
    assert len(names) == len(set(names))
    assert "layers.2.fc.weight" not in names and "layers.0.fc.weight" not in names
    assert all(set(g) == {"params", "param_names", "lr", "weight_decay"} for g in groups)

    opt = torch.optim.AdamW(groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == name.startswith("layers.0."), name


def test_errors_are_collected_and_nothing_is_returned():
    model = Tiny()
    with pytest.raises(ModelError) as info:
        param_groups(model, lr=-1, rules=[("head", {"lr": 1, "lr_mult": 2, "momentum": 0.9})])
    message = str(info.value)
    assert "lr must be" in message and "not both" in message and "momentum" in message
    with pytest.raises(ModelError, match=r"rule 1 must be a \(selector, options dict\) pair"):
        param_groups(model, lr=1e-3, rules=[("head", {"lr": 1e-2}), "layers"])
    with pytest.raises(SelectorError, match="haed"):
        param_groups(model, lr=1e-3, rules=[("haed", {"lr": 1e-2})])
    with pytest.raises(ModelError, match="no numbered layers"):
        param_groups(nn.Linear(2, 2), lr=1e-3, layer_decay=0.9)
    freeze_(model)
    with pytest.raises(ModelError, match="no trainable parameters"):
        param_groups(model, lr=1e-3)


def test_explain_renders_a_table_and_serializes():
    groups = param_groups(Tiny(), lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    report = groups.explain()
    assert isinstance(report, GroupsReport)
    text = str(groups)
    assert "weight_decay" in text and "embed.weight" in text and "0.000125" in text
    data = report.to_dict()
    assert data["schema"] == "weightsmith.param_groups/1"
    assert sum(g["tensors"] for g in data["groups"]) == 1 + 4 * 4 + 2 + 2  # embed, layers, norm, head
    assert repr(groups).startswith("ParamGroups(")
