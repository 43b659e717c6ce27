"""plan: what goes where and why, before anything is written — structural pairing, ambiguity, policies."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import weightsmith as ws
from weightsmith import LoadPlan, PlanError
from weightsmith.examples import model_a, model_b


def state_of(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    return {k: (v.detach().clone(), id(v)) for k, v in model.state_dict(keep_vars=True).items()}


def assert_same(model: nn.Module, before: dict[str, tuple[torch.Tensor, int]]) -> None:
    now = model.state_dict(keep_vars=True)
    assert list(now) == list(before)
    for k, v in now.items():
        assert torch.equal(v, before[k][0]) and id(v) == before[k][1], k


@pytest.fixture
def a_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "a.safetensors"
    ws.save(model_a(), path)
    return path


# -- renamed layers ---------------------------------------------------------------------------------
def test_a_renamed_layer_is_paired_structurally_with_confidence_and_reason(a_file):
    b = model_b()
    before = state_of(b)

    p = ws.plan(b, a_file, match="auto")

    assert_same(b, before)  # planning writes nothing
    steps = {s.target: s for s in p.steps}
    conv = steps["backbone_conv.weight"]
    assert conv.how == "structural" and conv.sources == ("conv1.weight",)
    assert 0.6 <= conv.confidence < 1.0
    assert conv.note == "aligned by module signature (bias [8], weight [8, 4]) with the modules around it"
    assert steps["backbone_conv.bias"].sources == ("conv1.bias",)
    assert steps["norm.weight"].how == "exact" and steps["fc.bias"].how == "exact"
    # the 3-class head has no 5-class counterpart: missing on one side, unused on the other
    assert steps["classifier.weight"].how == "missing" and steps["classifier.weight"].fill == "current value"
    assert {u.key for u in p.unused} == {"head.weight", "head.bias"}
    assert all("no target named" in u.reason and not u.expected for u in p.unused)
    assert p.problems == [] and p.ambiguous == []
    assert p.coverage == pytest.approx((32 + 8 + 16 + 72) / (32 + 8 + 16 + 72 + 45))


def test_a_rule_names_the_pairing_instead(a_file):
    p = ws.plan(model_b(), a_file, rename=[("conv1", "backbone_conv"), ("head", "classifier")], on_mismatch="skip")
    steps = {s.target: s for s in p.steps}
    assert steps["backbone_conv.weight"].how == "rule" and steps["backbone_conv.weight"].confidence == 1.0
    assert "conv1 -> backbone_conv" in steps["backbone_conv.weight"].note
    # skipping is a decision: listed as skipped, the source explained, nothing "missing" for a strict load
    assert steps["classifier.weight"].how == "skipped" and p.missing == []
    assert {u.key: u.reason for u in p.unused}["head.weight"].startswith("skipped: shape [3, 8] does not fit")
    assert all(u.expected for u in p.unused) and p.refusals() == []


def test_exact_matching_pairs_nothing_by_shape(a_file):
    p = ws.plan(model_b(), a_file, match="exact")
    steps = {s.target: s for s in p.steps}
    assert steps["backbone_conv.weight"].how == "missing"
    assert "conv1.weight" in {u.key for u in p.unused}
    assert p.counts() == {"missing": 4, "exact": 4}


class Pairs(nn.Module):
    def __init__(self, n: int, name: str) -> None:
        super().__init__()
        self.base = nn.Linear(4, 8)
        for i in range(n):
            setattr(self, f"{name}{i}", nn.Linear(8, 8))


def test_same_shaped_candidates_in_different_numbers_are_reported_never_guessed(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "two.safetensors"
    ws.save(Pairs(2, "old"), path)
    dst = Pairs(3, "new")
    before = state_of(dst)

    p = ws.plan(dst, path, match="auto")

    (ambiguous,) = p.ambiguous  # one decision per module: weight and bias together
    assert "2 source and 3 target modules" in ambiguous and "weight [8, 8]" in ambiguous
    assert "old0, old1" in ambiguous and "new0, new1, new2" in ambiguous
    assert all(s.how == "missing" for s in p.steps if s.target.startswith("new"))
    with pytest.raises(PlanError, match="ambiguous"):
        ws.load_(dst, path, match="auto")
    assert_same(dst, before)
    # not strict: the ambiguous targets keep their values
    report = ws.load_(dst, path, strict=False, min_coverage=0.0, match="auto")
    assert report.provenance["new0.weight"] == "current value"
    assert torch.equal(dst.new0.weight, before["new0.weight"][0])


class Stack(nn.Module):
    """A stem, twelve same-shaped layers under ``container``, and a head."""

    def __init__(self, container: str, inner: str) -> None:
        super().__init__()
        self.stem = nn.Linear(3, 4)
        setattr(self, container, nn.ModuleList(nn.ModuleDict({inner: nn.Linear(4, 4)}) for _ in range(12)))
        self.head = nn.Linear(4, 2)


def test_a_renamed_12_layer_stack_pairs_in_layer_order_whatever_the_file_order(tmp_path):
    torch.manual_seed(0)
    src = Stack("layers", "lin")
    path = tmp_path / "stack.safetensors"
    save_file(src.state_dict(), path)  # safetensors sorts by name: layers.10 before layers.2
    order = list(ws.open(path))
    assert order.index("layers.10.lin.weight") < order.index("layers.2.lin.weight")
    dst = Stack("blocks", "fc")

    p = ws.plan(dst, path, match="auto")

    assert p.problems == [] and p.ambiguous == []
    steps = {s.target: s for s in p.steps}
    for i in range(12):
        assert steps[f"blocks.{i}.fc.weight"].sources == (f"layers.{i}.lin.weight",)
        assert steps[f"blocks.{i}.fc.weight"].how == "structural"
    ws.load_(dst, path, match="auto")
    for i in range(12):
        assert torch.equal(dst.blocks[i].fc.weight, src.layers[i].lin.weight)
        assert torch.equal(dst.blocks[i].fc.bias, src.layers[i].lin.bias)
    x = torch.randn(2, 4)
    for i in (2, 10):
        assert torch.equal(dst.blocks[i].fc(x), src.layers[i].lin(x))


# -- shape policies -------------------------------------------------------------------------------
class Head(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, classes)


def test_a_shape_mismatch_is_a_problem_naming_key_and_both_shapes(tmp_path):
    path = tmp_path / "h3.safetensors"
    ws.save(Head(3), path)
    p = ws.plan(Head(5), path)
    assert len(p.problems) == 2
    assert "head.weight" in p.problems[0] and "[3, 8]" in p.problems[0] and "[5, 8]" in p.problems[0]
    assert "on_mismatch" in p.problems[0]
    # sources that failed on shape are never paired structurally instead
    assert {s.target: s.how for s in p.steps}["head.weight"] == "missing"
    skipped = ws.plan(Head(5), path, on_mismatch="skip")
    assert skipped.problems == []
    assert {u.key for u in skipped.unused} == {"head.weight", "head.bias"}


def test_a_rule_transform_that_does_not_fit_is_a_problem(tmp_path):
    src = nn.ModuleDict({"q": nn.Linear(4, 4), "k": nn.Linear(4, 3)})
    dst = nn.ModuleDict({"qk": nn.Linear(4, 8)})
    p = ws.plan(dst, src.state_dict(), rename=[(("q", "k"), "qk", "cat(1)")])
    assert p.problems and "qk.weight" in p.problems[0] and "cat(1)" in p.problems[0]


def test_two_sources_for_one_target_is_a_problem_not_a_choice():
    src = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    dst = nn.ModuleDict({"c": nn.Linear(2, 2)})
    p = ws.plan(dst, src.state_dict(), rename=[("a", "c"), ("b", "c")])
    assert any("claimed by a.weight and b.weight" in pr for pr in p.problems)


# -- the plan as data ---------------------------------------------------------------------------------
def test_the_plan_is_data_that_renders_and_serializes(a_file):
    p = ws.plan(model_b(), a_file, match="auto")
    assert isinstance(p, LoadPlan)
    d = json.loads(p.to_json())
    assert d["schema"] == "weightsmith.plan/1"
    assert d["steps"][0]["target"] == "backbone_conv.weight" and d["steps"][0]["how"] == "structural"
    assert d["counts"] == {"structural": 2, "exact": 4, "missing": 2}
    assert d["coverage"] == pytest.approx(p.coverage)
    text = str(p)
    assert "backbone_conv.weight" in text and "conv1.weight" in text and "confidence" in text
    assert "unused source head.weight" in text


def test_a_prefix_is_recorded_in_the_plan(tmp_path):
    torch.manual_seed(0)
    m = model_a()
    path = tmp_path / "dp.pt"
    torch.save(nn.DataParallel(m).state_dict(), path)
    p = ws.plan(model_a(), path)
    assert p.prefix == "strip 'module.'"
    assert {s.how for s in p.steps} == {"prefix"}
    assert p.steps[0].sources == ("module.conv1.weight",)


def test_a_plan_can_be_made_for_a_model_on_the_meta_device(a_file):
    with torch.device("meta"):
        m = model_a()
    p = ws.plan(m, a_file)
    assert p.problems == [] and p.counts() == {"exact": 8}


@pytest.mark.parametrize("options", [{"match": "fuzzy"}, {"on_mismatch": "explode"},
                                     {"on_mismatch": [("head.*", "guess")]}])
def test_bad_options_are_refused(a_file, options):
    with pytest.raises(ws.UsageError):
        ws.plan(model_b(), a_file, **options)


def test_a_source_of_the_wrong_kind_is_refused():
    with pytest.raises(ws.UsageError, match="cannot load from a int"):
        ws.plan(model_a(), 42)


# -- honest outcomes -------------------------------------------------------------------------------------
def test_skip_is_a_decision_a_strict_load_takes_and_the_plan_lists(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "h3.safetensors"
    src = Head(3)
    ws.save(src, path)
    dst = Head(5)
    head = dst.head.weight.detach().clone()

    p = ws.plan(dst, path, on_mismatch="skip")
    report = ws.load_(dst, path, on_mismatch="skip", min_coverage=0.4)  # strict: skipped keys are not "missing"

    assert [s.target for s in p.skipped] == ["head.weight", "head.bias"] and p.missing == []
    assert p.coverage == pytest.approx((32 + 8) / (32 + 8 + 40 + 5))  # skipped keys are not from the source
    assert p.verdict(min_coverage=0.4) == "ready: a strict load takes it; 2 target key(s) filled without the source"
    assert p.refusals() == [p.refusals()[0]] and p.refusals()[0].startswith("only 47% of Head's parameters")
    assert torch.equal(dst.head.weight, head) and torch.equal(dst.body.weight, src.body.weight)
    assert report.provenance["head.weight"] == "current value (skipped: source head.weight [3, 8] does not fit [5, 8])"
    text = str(p)
    assert "skipped" in text and "source head.weight [3, 8] does not fit" in text
    # with init= rules, a skipped key gets its initializer
    again = Head(5)
    ws.load_(again, path, on_mismatch="skip", init=[("head.*", "zeros")], min_coverage=0.4)
    assert torch.equal(again.head.weight, torch.zeros(5, 8))
    built, _ = ws.build(lambda: Head(5), path, on_mismatch="skip", min_coverage=0.4)
    assert torch.isfinite(built.head.weight).all() and built.head.weight.abs().sum() > 0


@pytest.mark.parametrize("share,text", [(1.0, "100%"), (0.9999, "99.99%"), (0.99999, "99.999%"), (0.994, "99%"),
                                        (0.99996, "99.996%"),
                                        (0.5, "50%"), (0.00001, "0.001%"), (0.0, "0%"), (0.123, "12%")])
def test_coverage_never_reads_100_percent_while_keys_are_missing(share, text):
    from weightsmith.warmstart.plan import format_share

    assert format_share(share) == text


def test_a_plan_one_key_short_of_full_coverage_does_not_say_100(tmp_path):
    big = nn.ModuleDict({"a": nn.Linear(100, 100), "b": nn.Linear(1, 1, bias=False)})
    state = {k: v for k, v in big.state_dict().items() if not k.startswith("b.")}
    p = ws.plan(big, state)
    assert p.coverage < 1.0
    assert "coverage 99.99% of target parameters" in str(p)


@pytest.mark.parametrize("options", [{}, {"strict": False}, {"match": "auto"}, {"match": "auto", "strict": False},
                                     {"match": "auto", "on_mismatch": "skip", "rename": [("head", "classifier")]},
                                     {"match": "auto", "strict": False, "min_coverage": 0.9}])
def test_the_verdict_says_what_load_does(a_file, options):
    options = dict(options)
    strict, min_coverage = options.pop("strict", True), options.pop("min_coverage", 0.5)
    dst = model_b()
    before = state_of(dst)
    p = ws.plan(model_b(), a_file, **options)
    try:
        ws.load_(dst, a_file, strict=strict, min_coverage=min_coverage, **options)
        loaded = True
    except PlanError as e:
        loaded = False
        assert_same(dst, before)  # a refused plan changes nothing
        assert list(e.problems) == p.refusals(strict=strict, min_coverage=min_coverage)
    assert p.verdict(strict=strict, min_coverage=min_coverage).startswith("ready") == loaded


def test_missing_and_unexpected_keys_name_both_sides_and_shapes(a_file):
    p = ws.plan(model_b(), a_file)  # names only: backbone_conv is missing, conv1 unexplained
    refused = "\n".join(p.refusals())
    assert ("missing: backbone_conv.weight [8, 4] has no value in the source; the closest unused source key is "
            "conv1.weight [8, 4]") in refused
    assert "unexpected: source conv1.weight [8, 4]: no target named 'conv1.weight'" in refused


def test_steps_carry_typed_ops_and_serialize_them_as_text():
    from weightsmith.warmstart.transforms import Adapter, Cast, Transform

    src = {"proj.weight": torch.randn(3, 4), "head.weight": torch.randn(5, 8, dtype=torch.float64)}
    model = nn.ModuleDict({"proj": nn.Linear(3, 4, bias=False), "head": nn.Linear(8, 7, bias=False)})
    p = ws.plan(model, src, rename=[("proj", "proj", "transpose")], on_mismatch="adapt")
    steps = {s.target: s for s in p.steps}
    assert [type(o) for o in steps["proj.weight"].ops] == [Transform]
    assert [type(o) for o in steps["head.weight"].ops] == [Adapter, Cast]
    assert steps["head.weight"].transforms[1] == "cast float64->float32"
    d = p.to_dict()["steps"]
    assert [s["transforms"] for s in d] == [["transpose"], list(steps["head.weight"].transforms)]
    assert all("ops" not in s for s in d)
    report = ws.load_(model, src, rename=[("proj", "proj", "transpose")], on_mismatch="adapt")
    assert torch.equal(model.proj.weight.detach(), src["proj.weight"].t())
    assert report.loaded == 2


@pytest.mark.parametrize("call", ["load_", "plan_options"])
def test_an_unknown_plan_option_is_a_usage_error_naming_it(call):
    model = nn.Linear(2, 2)
    with pytest.raises(ws.UsageError, match="renmae"):
        if call == "load_":
            ws.load_(model, model.state_dict(), renmae={"a": "b"})
        else:
            ws.build(lambda: nn.Linear(2, 2), model.state_dict(), renmae={"a": "b"})
