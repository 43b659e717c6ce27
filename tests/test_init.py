import json
import math

import pytest
import torch
from torch import nn

from weightsmith import ModelError, SelectorError, init_
from weightsmith.init import INITIALIZERS, _derive_seed


from _models import make_mlp, make_tied


def one(shape: tuple[int, ...], spec, **kwargs) -> torch.Tensor:
    """Initialize a lone parameter of ``shape`` with ``spec`` and return its values."""
    holder = nn.Module()
    holder.w = nn.Parameter(torch.full(shape, 123.0))
    init_(holder, [("w", spec)], **kwargs)
    return holder.w.detach()


def test_simple_initializers_by_name():
    assert torch.equal(one((3, 4), "zeros"), torch.zeros(3, 4))
    assert torch.equal(one((3, 4), "ones"), torch.ones(3, 4))
    assert torch.equal(one((3, 4), "constant(1)"), torch.ones(3, 4))
    assert torch.equal(one((3, 4), "constant(val=-2.5)"), torch.full((3, 4), -2.5))
    assert torch.equal(one((4, 4), "eye"), torch.eye(4))
    w = one((4, 4, 3), "dirac")
    assert torch.equal(w[:, :, 1], torch.eye(4)) and w[:, :, 0].abs().sum() == 0


def test_random_initializers_have_the_documented_distributions():
    w = one((256, 256), "uniform(a=-0.1, b=0.1)", seed=0)
    assert w.min() >= -0.1 and w.max() <= 0.1 and w.std() > 0.05
    assert one((256, 256), "normal(std=0.02)", seed=0).std().item() == pytest.approx(0.02, rel=0.05)
    w = one((256, 256), "trunc_normal(std=0.02)", seed=0)
    assert w.std().item() == pytest.approx(0.02, rel=0.05) and w.abs().max() <= 2.0
    bound = math.sqrt(6 / (128 + 256))
    w = one((256, 128), "xavier_uniform(gain=1.0)", seed=0)
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    w = one((256, 128), "xavier_normal", seed=0)
    assert w.std().item() == pytest.approx(math.sqrt(2 / 384), rel=0.05)
    w = one((256, 128), "kaiming_normal(mode='fan_out', nonlinearity='relu')", seed=0)
    assert w.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.05)
    w = one((256, 128), "kaiming_uniform", seed=0)  # torch's default: leaky_relu with a=0
    assert w.abs().max() <= math.sqrt(6 / 128)
    w = one((32, 64), "orthogonal", seed=0)
    assert torch.allclose(w @ w.T, torch.eye(32), atol=1e-5)
    w = one((10, 50), "sparse(0.1)", seed=0)
    assert ((w == 0).sum(dim=0) >= 1).all() and (w != 0).sum() > 0


def test_named_initializers_are_torchs_own_with_a_seeded_generator():
    got = one((16, 8), "xavier_uniform", seed=7)
    generator = torch.Generator().manual_seed(_derive_seed(7, "w"))
    expected = nn.init.xavier_uniform_(torch.empty(16, 8), generator=generator)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("spec", sorted(INITIALIZERS))
def test_seeded_runs_are_reproducible_and_leave_the_global_rng_alone(spec):
    shape = (4, 4, 3) if spec == "dirac" else (6, 6)
    text = {"constant": "constant(0.3)", "sparse": "sparse(0.5)"}.get(spec, spec)
    state = torch.random.get_rng_state()
    first = one(shape, text, seed=11)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(one(shape, text, seed=11), first)


def test_seeds_depend_on_names_not_on_order():
    a, b = make_mlp(), make_mlp()
    init_(a, [("*.weight", "normal"), ("*.bias", "uniform")], seed=3)
    init_(b, [("*.bias", "uniform"), ("*.weight", "normal")], seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    c = make_mlp()
    init_(c, [("2.weight", "normal")], seed=3)  # alone, it gets the same values
    assert torch.equal(c[2].weight, a[2].weight)
    d = make_mlp()
    init_(d, [("*.weight", "normal"), ("*.bias", "uniform")], seed=4)
    assert not torch.equal(d[0].weight, a[0].weight)
    twins = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    init_(twins, [("*.weight", "normal")], seed=3)
    assert not torch.equal(twins[0].weight, twins[1].weight)


def test_without_a_seed_the_global_rng_is_used():
    torch.manual_seed(5)
    first = one((8, 8), "normal")
    torch.manual_seed(5)
    assert torch.equal(one((8, 8), "normal"), first)


def test_first_matching_rule_wins_and_unmatched_parameters_are_untouched():
    model = make_mlp()
    old_bias = model[0].bias.detach().clone()
    report = init_(model, [("2.*", "zeros"), ("*.weight", "ones")])
    assert torch.equal(model[2].weight, torch.zeros(1, 8))
    assert torch.equal(model[0].weight, torch.ones(8, 4))
    assert torch.equal(model[0].bias, old_bias)
    assert report.untouched == ("0.bias",)
    assert report.initializers == {"0.weight": "ones", "2.weight": "zeros", "2.bias": "zeros"}


def test_custom_callable_initializer_s8():
    def sparse_uniform(w: torch.Tensor) -> None:
        nn.init.uniform_(w, -10, 10)
        w[w.abs() < 5] = 0

    model = make_mlp()
    state = torch.random.get_rng_state()
    report = init_(model, [("*.weight", sparse_uniform)], seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    w = model[0].weight
    assert ((w == 0) | (w.abs() >= 5)).all() and (w == 0).any() and (w != 0).any()
    assert w.abs().max() <= 10
    assert report.initializers["0.weight"] == "sparse_uniform"
    again = make_mlp()
    init_(again, [("*.weight", sparse_uniform)], seed=1)
    assert torch.equal(again[0].weight, w)


def test_a_callable_returning_new_values_has_them_written():
    model = make_mlp()
    init_(model, [("*.bias", lambda t: torch.full_like(t, 0.25))])
    assert torch.equal(model[0].bias, torch.full((8,), 0.25))


def conv_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Embedding(100, 64), nn.Conv2d(64, 128, 3), nn.BatchNorm2d(128),
        nn.GroupNorm(4, 128), nn.LayerNorm(128), nn.Linear(128, 64), nn.MultiheadAttention(8, 2),
    )


def test_default_preset_s7():
    model = conv_net()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(9.0)
    report = init_(model, "default", seed=0)
    emb, conv, bn, gn, ln, lin = (model[i] for i in range(6))
    assert emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    fan_out = 128 * 3 * 3
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    assert conv.bias.abs().sum() == 0
    for norm in (bn, gn, ln):
        assert torch.equal(norm.weight, torch.ones(128)) and norm.bias.abs().sum() == 0
    assert lin.weight.abs().max() <= math.sqrt(6 / (128 + 64)) and lin.bias.abs().sum() == 0
    got = report.initializers
    assert got["1.weight"] == "kaiming_normal(mode='fan_out', nonlinearity='relu')"
    assert got["5.weight"] == "xavier_uniform" and got["2.weight"] == "ones"
    assert got["0.weight"] == "normal(std=0.02)"
    assert "6.in_proj_weight" in report.untouched  # no default for attention internals
    assert torch.equal(model[6].in_proj_weight, torch.full_like(model[6].in_proj_weight, 9.0))


@pytest.mark.parametrize("rules", ["default", [("*.weight", "ones")], [("*", lambda t: t.fill_(2.0))]])
def test_an_embeddings_padding_row_stays_zero_whatever_the_rule(rules):
    model = nn.Sequential(nn.Embedding(10, 4, padding_idx=3), nn.Linear(4, 10))
    lm = nn.Module()
    lm.emb = nn.Embedding(6, 4, padding_idx=-1)  # -1: the last row
    lm.head = nn.Linear(4, 6, bias=False)
    lm.head.weight = lm.emb.weight  # tied: the padding row is still the embedding's

    report = init_(model, rules, seed=0)
    tied = init_(lm, rules, seed=0)

    weight = model[0].weight
    assert torch.equal(weight[3], torch.zeros(4))
    assert bool((weight[[0, 1, 2, 4, 5]] != 0).all())
    assert report.initializers["0.weight"].endswith("; padding row 3 zeroed")
    assert torch.equal(lm.emb.weight[5], torch.zeros(4)) and bool((lm.emb.weight[:5] != 0).all())
    assert "padding row 5 zeroed" in tied.initializers["emb.weight"]


def test_rules_by_module_type_with_per_name_initializers():
    model = conv_net()
    init_(model, [((nn.Linear, nn.Conv2d), {"weight": "orthogonal", "bias": "constant(0.5)"})], seed=0)
    assert torch.equal(model[5].bias, torch.full((64,), 0.5))
    assert torch.equal(model[1].bias, torch.full((128,), 0.5))
    assert torch.allclose(model[5].weight @ model[5].weight.T, torch.eye(64), atol=1e-5)


def test_unknown_and_malformed_initializers_are_listed_together():
    model = make_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    rules = [
        ("0.weight", "nrmal(std=1)"),
        ("0.bias", "normal(std=__import__('os').getpid())"),
        ("2.weight", "normal(sd=1)"),
        ("2.bias", "uniform(**{'a': 1})"),
    ]
    with pytest.raises(ModelError) as info:
        init_(model, rules)
    text = str(info.value)
    assert "unknown initializer 'nrmal'" in text and "xavier_uniform" in text and "dirac" in text
    assert "rule 1" in text and "rule 2" in text and "'sd'" in text and "rule 3" in text
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_initializers_that_do_not_fit_are_caught_before_anything_is_written():
    model = make_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ModelError) as info:
        init_(model, [("*", "xavier_uniform")])
    assert "'0.bias' (8,)" in str(info.value) and "'2.bias' (1,)" in str(info.value)
    with pytest.raises(ModelError, match="mode"):
        init_(model, [("*.weight", "kaiming_normal(mode='fan_sideways')")])
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_a_rule_or_skip_matching_nothing_is_an_error():
    with pytest.raises(SelectorError, match="rule 1"):
        init_(make_mlp(), [("*.weight", "zeros"), (nn.Conv2d, "zeros")])
    with pytest.raises(SelectorError, match="'wieght'"):
        init_(make_mlp(), [(nn.Linear, {"wieght": "zeros"})])
    with pytest.raises(SelectorError):
        init_(make_mlp(), "default", skip="head.*")
    init_(make_mlp(), "default")  # the preset's rules for absent layer types are fine


def test_skip_leaves_parameters_alone():
    model = make_mlp()
    old = model[2].weight.detach().clone()
    report = init_(model, "default", skip="2.weight")
    assert torch.equal(model[2].weight, old)
    assert report.skipped == ("2.weight",)
    assert model[2].bias.abs().sum() == 0


def test_tied_parameters_are_initialized_once():
    model = make_tied()
    calls = []
    report = init_(model, [("*.weight", lambda t: calls.append(t.shape))])
    assert len(calls) == 2
    assert [e.tied for e in report.entries] == [(), ("3.weight",)]
    assert report.initializers["3.weight"] == "<lambda>"


def test_meta_parameters_are_materialized_keeping_ties_and_requires_grad():
    with torch.device("meta"):
        model = make_tied()
    model[0].bias.requires_grad_(False)
    with pytest.raises(ModelError, match="device="):
        init_(model, "default")
    report = init_(model, "default", device="cpu", seed=0)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model[1].weight is model[3].weight
    assert not model[0].bias.requires_grad and model[0].weight.requires_grad
    assert report.materialized == ("0.weight", "0.bias", "1.weight", "3.weight", "1.bias", "3.bias")
    assert report.still_meta == ()
    model(torch.ones(2, 4)).sum().backward()  # a working model


def test_meta_parameters_without_a_rule_stay_on_meta_and_are_reported():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    report = init_(model, [("0.*", "zeros")], device="cpu")
    assert report.untouched == ("1.weight", "1.bias")
    assert "1.weight" in report.still_meta and "1.running_mean" in report.still_meta


def test_report_renders_and_serializes():
    report = init_(make_mlp(), "default", seed=0)
    text = str(report)
    assert "0.weight" in text and "xavier_uniform" in text and "(seed 0)" in text
    data = json.loads(report.to_json())
    assert data["schema"] == "weightsmith.init/1"
    assert data["entries"][1] == {"name": "0.bias", "shape": [8], "initializer": "zeros", "tied": []}


def test_rules_must_be_pairs_or_the_preset():
    with pytest.raises(ModelError, match="preset"):
        init_(make_mlp(), "defaults")
    with pytest.raises(ModelError, match="pair"):
        init_(make_mlp(), [("*.weight",)])
    with pytest.raises(ModelError, match="callable"):
        init_(make_mlp(), {"*.weight": 0.5})
