import json

import pytest
import torch
from torch import nn

import weightsmith as ws
from weightsmith.errors import TieError
from weightsmith.tie import TieReport, ties, tie_, untie_


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def reused() -> nn.Sequential:
    """The running example's tied variant: one Linear(8, 8) used twice."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    return nn.Sequential(nn.Linear(4, 8), lin, nn.ReLU(), lin, nn.Linear(8, 1))


class EmbedDecode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.decoder = nn.Linear(8, 10)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.embed(idx))


def unique_count(model: nn.Module) -> int:
    return len({id(p) for p in model.parameters()})


def snapshot(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    return {n: (id(p), p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)}


def assert_untouched(model: nn.Module, before: dict[str, tuple[int, torch.Tensor]]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, (ident, value) in before.items():
        assert after[name][0] == ident, name
        assert torch.equal(after[name][1], value), name


def test_ties_lists_groups_of_a_reused_module_in_module_order():
    assert ties(reused()) == [("1.weight", "3.weight"), ("1.bias", "3.bias")]
    assert ties(mlp()) == []
    assert ws.ties is ties


def test_ties_reports_shared_buffers_only_when_asked():
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(bn, nn.Linear(4, 4), bn)
    assert ties(model) == [("0.weight", "2.weight"), ("0.bias", "2.bias")]
    with_buffers = ties(model, buffers=True)
    assert ("0.running_mean", "2.running_mean") in with_buffers
    assert ("0.num_batches_tracked", "2.num_batches_tracked") in with_buffers


def test_ties_ignores_distinct_parameters_sharing_storage():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = nn.Parameter(model[0].weight.data)  # same memory, separate leaves
    assert model[1].weight.data_ptr() == model[0].weight.data_ptr()
    assert ties(model) == []


def test_tie_parameter_makes_target_the_source_object_and_reports_replacement():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    old = model[1].weight
    before = unique_count(model)
    report = tie_(model, "1.weight", "0.weight")
    assert model[1].weight is model[0].weight
    assert model[1].weight is not old
    assert report.tied == [("1.weight", "0.weight")]
    assert report.replaced == ["1.weight"]
    assert unique_count(model) == before - 1
    assert ties(model) == [("0.weight", "1.weight")]
    assert sum(p.numel() for p in model.parameters()) == 8 * 8 + 8 + 8  # one weight, two biases


def test_gradients_of_both_uses_accumulate_and_one_step_moves_both():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Tanh(), nn.Linear(8, 8, bias=False))
    tie_(model, "2.weight", "0.weight")
    w = model[0].weight.detach().clone()
    x = torch.randn(5, 8)

    # the same computation with two separate copies of the weight gives each use's share
    w0, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    (torch.tanh(x @ w0.T) @ w2.T).pow(2).sum().backward()
    model(x).pow(2).sum().backward()
    assert torch.allclose(model[0].weight.grad, w0.grad + w2.grad)
    assert not torch.allclose(model[0].weight.grad, w0.grad)

    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.equal(model[0].weight, model[2].weight)
    assert torch.allclose(model[0].weight, w - 0.1 * (w0.grad + w2.grad))


def test_tie_modules_pairs_same_named_parameters_and_skips_the_rest():
    model = EmbedDecode()
    report = tie_(model, "decoder", "embed")
    assert model.decoder.weight is model.embed.weight
    assert report.tied == [("decoder.weight", "embed.weight")]
    assert report.skipped == ["decoder.bias"]
    assert report.replaced == ["decoder.weight"]
    logits = model(torch.tensor([1, 2]))
    logits.sum().backward()
    assert model.embed.weight.grad is not None
    assert model.embed.weight.grad[5].abs().sum() > 0  # reached through the decoder use only


def test_tie_shape_mismatch_names_both_sides_and_changes_nothing():
    model = mlp()
    before = snapshot(model)
    with pytest.raises(TieError) as info:
        tie_(model, "2.weight", "0.weight")
    message = str(info.value)
    assert "2.weight is [1, 8]" in message and "0.weight is [8, 4]" in message
    assert_untouched(model, before)


def test_tie_lists_every_problem_at_once():
    model = mlp()
    with pytest.raises(TieError) as info:
        tie_(model, "0.wieght", "9.weight")
    message = str(info.value)
    assert "'0.wieght'" in message and "'9.weight'" in message
    assert "did you mean 0.weight" in message


def test_tie_refuses_buffers_mixed_kinds_and_dtype_mismatch():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4).double())
    before = snapshot(model)
    with pytest.raises(TieError, match="buffer"):
        tie_(model, "1.running_mean", "0.bias")
    with pytest.raises(TieError, match="give two parameter names or two module names"):
        tie_(model, "0.weight", "2")
    with pytest.raises(TieError, match=r"dtype mismatch: 2.weight is torch.float64, 0.weight is torch.float32"):
        tie_(model, "2.weight", "0.weight")
    with pytest.raises(TieError, match=r"0.weight is \[4, 4\], 1.weight is \[4\]"):
        tie_(model, "0", "1")  # BatchNorm also has weight and bias, of other shapes
    assert_untouched(model, before)


def test_tie_modules_without_common_names_is_an_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TieError, match="no parameter names in common"):
        tie_(model, "0", "1")


def test_tie_twice_is_unchanged_and_replaces_nothing():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    tie_(model, "1.weight", "0.weight")
    report = tie_(model, "1.weight", "0.weight")
    assert report.unchanged == ["1.weight"] and report.tied == [] and report.replaced == []


def test_tie_inside_a_reused_module_reports_every_alias_replaced():
    model = reused()
    model.append(nn.Linear(1, 8))
    model.append(nn.Linear(8, 8))
    report = tie_(model, "3.weight", "6.weight")
    assert report.replaced == ["1.weight", "3.weight"]  # module 1 is module 3
    assert model[1].weight is model[6].weight


def test_untie_gives_own_clone_with_same_values_and_flag():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    tie_(model, "1.weight", "0.weight")
    model[0].weight.requires_grad_(False)
    report = untie_(model, "1.weight")
    assert model[1].weight is not model[0].weight
    assert torch.equal(model[1].weight, model[0].weight)
    assert model[1].weight.requires_grad is False
    assert isinstance(model[1].weight, nn.Parameter)
    assert report.untied == ["1.weight"] and report.replaced == ["1.weight"]
    assert ties(model) == []
    with torch.no_grad():
        model[1].weight.add_(1)
    assert not torch.equal(model[1].weight, model[0].weight)


def test_untie_a_reused_module_copies_it_and_keeps_the_output():
    model = reused()
    x = torch.randn(3, 4)
    expected = model(x)
    original = model[1]
    report = untie_(model, "3")
    assert report.copied_modules == ["3"]
    assert report.untied == ["3.weight", "3.bias"]
    assert report.replaced == ["3.weight", "3.bias"]
    assert model[1] is original and model[3] is not original
    assert ties(model) == []
    assert torch.equal(model(x), expected)
    with torch.no_grad():
        model[3].weight.zero_()
    assert model[1].weight.abs().sum() > 0


def test_untie_in_a_nested_reused_block_keeps_other_parameters_shared():
    block = nn.Sequential(nn.Linear(4, 4))
    model = nn.Sequential(block, block)
    report = untie_(model, "1.0.weight")
    assert report.copied_modules == ["1"]
    assert model[1][0].weight is not model[0][0].weight
    assert model[1][0].bias is model[0][0].bias
    assert ties(model) == [("0.0.bias", "1.0.bias")]


def test_untie_of_a_whole_group_keeps_the_original_at_the_first_name():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    tie_(model, "1.weight", "0.weight")
    tie_(model, "2.weight", "0.weight")
    original = model[0].weight
    report = untie_(model, ["0.weight", "1.weight", "2.weight"])
    assert model[0].weight is original
    assert report.replaced == ["1.weight", "2.weight"]
    assert len({id(m.weight) for m in model}) == 3


def test_untie_of_untied_names_is_unchanged_and_unknown_names_fail_first():
    model = mlp()
    before = snapshot(model)
    report = untie_(model, ["0.weight"])
    assert report.unchanged == ["0.weight"] and report.replaced == []
    tied = reused()
    before = snapshot(tied)
    with pytest.raises(TieError, match="'nope'"):
        untie_(tied, ["3.weight", "nope"])
    assert_untouched(tied, before)


def test_report_renders_and_serializes():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    report = tie_(model, "1", "0")
    assert isinstance(report, TieReport)
    text = str(report)
    assert "1.weight" in text and "now uses 0.weight" in text and "rebuild the optimizer" in text
    data = json.loads(report.to_json())
    assert data["schema"] == "weightsmith.tie/1"
    assert data["tied"] == [["1.weight", "0.weight"], ["1.bias", "0.bias"]]
