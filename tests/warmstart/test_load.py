"""load_: wrapped checkpoints, rename rules, all-or-nothing failures, and what a successful load keeps."""

import json
import os
from collections.abc import Mapping

import pytest
import torch
from torch import nn

import weightsmith as ws
from weightsmith import CheckpointError, ModelError, PlanError, Rule, WeightsmithError
from weightsmith.examples import model_a, model_b

X = torch.randn(5, 4, generator=torch.Generator().manual_seed(7))


def fresh_a(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return model_a()


@pytest.fixture
def src_a() -> nn.Module:
    torch.manual_seed(0)
    return model_a().eval()


# -- snapshots: values, Parameter objects, requires_grad and ties -------------------------------------
def snapshot(model: nn.Module) -> dict:
    state = model.state_dict(keep_vars=True)
    params = dict(model.named_parameters(remove_duplicate=False))
    return {
        "values": {k: v.detach().clone() for k, v in state.items()},
        "ids": {k: id(v) for k, v in state.items()},
        "grad": {k: p.requires_grad for k, p in params.items()},
        "ties": {(a, b) for a in params for b in params if a < b and params[a] is params[b]},
    }


def assert_untouched(model: nn.Module, snap: dict) -> None:
    state = model.state_dict(keep_vars=True)
    params = dict(model.named_parameters(remove_duplicate=False))
    assert list(state) == list(snap["values"])
    for k, v in state.items():
        assert torch.equal(v, snap["values"][k]), f"{k} changed"
        assert id(v) == snap["ids"][k], f"{k} is another object"
    assert {k: p.requires_grad for k, p in params.items()} == snap["grad"]
    assert {(a, b) for a in params for b in params if a < b and params[a] is params[b]} == snap["ties"]


# -- wrapper prefixes ----------------------------------------------------------------------------------
def _compiled(m):
    return torch.compile(m).state_dict()  # keys gain "_orig_mod."; nothing is compiled until called


WRAPPED = {
    "DataParallel": lambda m: nn.DataParallel(m).state_dict(),
    "torch.compile": _compiled,
    "compile(DataParallel)": lambda m: _compiled(nn.DataParallel(m)),
    "PEFT": lambda m: {"base_model.model." + k: v for k, v in m.state_dict().items()},
}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing torch.compile's machinery warns
@pytest.mark.parametrize("wrapper", list(WRAPPED))
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_a_wrapped_checkpoint_loads_into_the_plain_model(tmp_path, src_a, wrapper, fmt):
    state = WRAPPED[wrapper](src_a)
    assert all(not k.startswith(("conv1", "head")) for k in state)  # really wrapped
    path = tmp_path / f"ckpt.{fmt}"
    if fmt == "pt":
        torch.save(state, path)
    else:
        ws.save(state, path)
    dst = fresh_a().eval()
    assert not torch.allclose(dst(X), src_a(X))

    report = ws.load_(dst, path)

    assert torch.equal(dst(X), src_a(X))
    assert report.loaded == 8 and report.coverage == 1.0
    prefix = next(iter(state)).removesuffix("conv1.weight")
    assert report.provenance["conv1.weight"] == prefix + "conv1.weight"


def test_a_lightning_checkpoint_is_read_from_its_state_dict_root(tmp_path, src_a):
    path = tmp_path / "epoch=3.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in src_a.state_dict().items()},
                "epoch": 3, "global_step": 120, "hyper_parameters": {"lr": 0.1}}, path)
    ckpt = ws.open(path)
    assert ckpt.root == "state_dict"
    dst = fresh_a().eval()

    report = ws.load_(dst, ckpt)

    assert torch.equal(dst(X), src_a(X))
    assert report.provenance["head.bias"] == "model.head.bias"
    dst2 = fresh_a().eval()
    ws.load_(dst2, path)  # a path is opened with the root chosen the same way
    assert torch.equal(dst2(X), src_a(X))


def test_a_hf_base_model_prefix_with_an_extra_head_on_the_source(tmp_path, src_a):
    state = {"bert." + k: v for k, v in src_a.state_dict().items()}
    state["classifier.weight"], state["classifier.bias"] = torch.randn(2, 3), torch.randn(2)
    path = tmp_path / "seqcls.safetensors"
    ws.save(state, path)
    dst = fresh_a().eval()
    snap = snapshot(dst)

    with pytest.raises(PlanError, match="classifier.weight"):  # strict: the extra head must be explained
        ws.load_(dst, path)
    assert_untouched(dst, snap)
    report = ws.load_(dst, path, strict=False)

    assert torch.equal(dst(X), src_a(X))
    assert set(report.unused) == {"classifier.weight", "classifier.bias"}
    assert report.provenance["conv1.weight"] == "bert.conv1.weight"


class WithBase(nn.Module):
    """A task model whose base model sits under ``bert.``, as in Hugging Face."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = model_a()
        self.classifier = nn.Linear(3, 2)


def test_a_plain_checkpoint_loads_into_a_model_that_has_the_base_prefix(tmp_path, src_a):
    path = tmp_path / "base.safetensors"
    ws.save(src_a, path)
    torch.manual_seed(3)
    dst = WithBase().eval()
    classifier = dst.classifier.weight.detach().clone()

    report = ws.load_(dst, path, strict=False)

    assert torch.equal(dst.bert(X), src_a(X))
    assert report.provenance["bert.conv1.weight"] == "conv1.weight"
    assert report.provenance["classifier.weight"] == "current value"
    assert torch.equal(dst.classifier.weight, classifier)


# -- rename rules with real models ---------------------------------------------------------------------
class Separate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({n: nn.Linear(8, 8) for n in "qkv"}) for _ in range(2))

    def forward(self, x, i):
        return torch.cat([self.layers[i][n](x) for n in "qkv"], -1)


class Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"qkv": nn.Linear(8, 24)}) for _ in range(2))

    def forward(self, x, i):
        return self.blocks[i]["qkv"](x)


def test_separate_q_k_v_fuse_into_one_qkv_by_cat(tmp_path):
    torch.manual_seed(0)
    src = Separate()
    path = tmp_path / "sep.safetensors"
    ws.save(src, path)
    dst = Fused()
    rule = Rule(("layers.{i}.q", "layers.{i}.k", "layers.{i}.v"), "blocks.{i}.qkv", "cat(0)")

    report = ws.load_(dst, path, rename=[rule])

    x = torch.randn(3, 8)
    for i in range(2):
        assert torch.allclose(dst(x, i), src(x, i), atol=1e-6)
    assert report.provenance["blocks.1.qkv.weight"] == \
        "layers.1.q.weight, layers.1.k.weight, layers.1.v.weight + cat(0)"
    assert report.unused == {}


def test_one_qkv_splits_into_q_k_v_by_chunk(tmp_path):
    torch.manual_seed(0)
    src = Fused()
    path = tmp_path / "fused.pt"
    torch.save(src.state_dict(), path)
    dst = Separate()

    report = ws.load_(dst, path, rename=[("blocks.{i}.qkv", ("layers.{i}.q", "layers.{i}.k", "layers.{i}.v"),
                                          "chunk(3, 0)")])

    x = torch.randn(3, 8)
    for i in range(2):
        assert torch.allclose(dst(x, i), src(x, i), atol=1e-6)
    assert report.provenance["layers.0.v.bias"] == "blocks.0.qkv.bias + chunk(3, 0)"


class Conv1D(nn.Module):
    """GPT-2's linear layer: weight stored as [in, out]."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.1)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


def gpt_mlp() -> nn.Module:
    return nn.ModuleDict({"h": nn.ModuleList(nn.ModuleDict({"c_fc": Conv1D(8, 16)}) for _ in range(3))})


def our_mlp() -> nn.Module:
    return nn.ModuleDict({"blocks": nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(8, 16)}) for _ in range(3))})


def test_conv1d_weights_transpose_into_linear_layers_and_back(tmp_path):
    torch.manual_seed(0)
    gpt = gpt_mlp()
    path = tmp_path / "gpt.safetensors"
    ws.save(gpt, path)
    ours = our_mlp()
    rules = [(r"re:^h\.(\d+)\.c_fc\.weight$", r"blocks.\1.fc.weight", "transpose"),  # weight only: biases are 1-D
             ("h.{i}.c_fc", "blocks.{i}.fc")]

    report = ws.load_(ours, path, rename=rules)

    x = torch.randn(2, 8)
    for i in range(3):
        assert torch.allclose(ours["blocks"][i]["fc"](x), gpt["h"][i]["c_fc"](x), atol=1e-6)
    assert report.provenance["blocks.2.fc.weight"] == "h.2.c_fc.weight + transpose"
    assert report.provenance["blocks.2.fc.bias"] == "h.2.c_fc.bias"

    back = gpt_mlp()
    ws.load_(back, ours.state_dict(), rename=[("blocks.{i}.fc.weight", "h.{i}.c_fc.weight", "transpose"),
                                             ("blocks.{i}.fc", "h.{i}.c_fc")])
    for i in range(3):
        assert torch.equal(back["h"][i]["c_fc"].weight, gpt["h"][i]["c_fc"].weight)


def test_rules_from_toml_and_json_files_load_the_renamed_model(tmp_path):
    torch.manual_seed(0)
    a = model_a()
    path = tmp_path / "a.safetensors"
    ws.save(a, path)
    toml = tmp_path / "rules.toml"
    toml.write_text('[[rename]]\nsource = "conv1"\ntarget = "backbone_conv"\n\n'
                    '[[rename]]\nsource = "head"\ntarget = "classifier"\n')
    js = tmp_path / "rules.json"
    js.write_text(json.dumps([{"source": "conv1", "target": "backbone_conv"},
                              {"source": "head", "target": "classifier"}]))
    for rules in (toml, js, str(toml)):
        b = model_b()
        report = ws.load_(b, path, rename=rules, on_mismatch="adapt")
        assert torch.equal(b.backbone_conv.weight, a.conv1.weight)
        assert torch.equal(b.classifier.weight[:3], a.head.weight)
        assert report.provenance["backbone_conv.bias"] == "conv1.bias"
        assert report.provenance["classifier.weight"].startswith("head.weight + adapt:rows")


def test_a_malformed_rules_file_is_refused_before_anything_is_written(tmp_path, src_a):
    path = tmp_path / "a.safetensors"
    ws.save(src_a, path)
    bad = tmp_path / "rules.toml"
    bad.write_text("[[rename]]\nsource = 're:('\ntarget = 'x'\n")
    dst = model_b()
    snap = snapshot(dst)
    with pytest.raises(WeightsmithError, match="rules.toml"):
        ws.load_(dst, path, rename=bad)
    assert_untouched(dst, snap)


# -- all or nothing ----------------------------------------------------------------------------------
def victim() -> nn.Sequential:
    """A target with a tie, a frozen weight and BatchNorm buffers."""
    torch.manual_seed(1)
    shared = nn.Linear(8, 8)
    m = nn.Sequential(nn.Linear(4, 8), shared, nn.BatchNorm1d(8), shared, nn.Linear(8, 2))
    m[0].weight.requires_grad_(False)
    return m


def donor_state() -> dict[str, torch.Tensor]:
    """Another victim's values, buffers included, all different from `victim()`'s."""
    torch.manual_seed(2)
    d = victim()
    with torch.no_grad():
        d[2].running_mean.fill_(0.5)
        d[2].running_var.fill_(2.0)
        d[2].num_batches_tracked.fill_(9)
    return {k: v.detach().clone() for k, v in d.state_dict().items()}


class RaisesOnThirdKey(dict):
    """A state dict whose third key cannot be read (as an I/O error halfway through would)."""

    def __getitem__(self, key):
        if key == list(self)[2]:
            raise OSError(f"I/O error reading {key}")
        return super().__getitem__(key)


class LazyMapping(Mapping):
    """A read-only mapping over a dict whose third value fails to read."""

    def __init__(self, data):
        self._data = data

    def __getitem__(self, key):
        if key == list(self._data)[2]:
            raise OSError(f"I/O error reading {key}")
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)


def _shape_mismatch(tmp_path):
    s = donor_state()
    s["4.weight"] = torch.randn(3, 8)
    return (s,), {}


def _missing(tmp_path):
    s = donor_state()
    del s["4.weight"], s["4.bias"]
    return (s,), {}


def _unexpected(tmp_path):
    s = donor_state()
    s["extra.weight"] = torch.randn(5, 5)
    return (s,), {}


def _nothing_matches(tmp_path):
    return ({"alien.weight": torch.randn(7, 3), "alien.bias": torch.randn(7)},), {"strict": False}


def _low_coverage(tmp_path):
    s = donor_state()
    return ({k: s[k] for k in ("4.bias", "2.running_mean")},), {"strict": False}


def _raising_dict(tmp_path):
    return (RaisesOnThirdKey(donor_state()),), {}


def _raising_mapping(tmp_path):
    return (LazyMapping(donor_state()),), {}


def _truncated_file(tmp_path):
    path = tmp_path / "donor.safetensors"
    ws.save(donor_state(), path)
    ckpt = ws.open(path)
    with open(path, "r+b") as f:  # cut the data short after the header was read
        f.truncate(os.path.getsize(path) - 64)
    return (ckpt,), {}


def _deleted_file(tmp_path):
    path = tmp_path / "donor.safetensors"
    ws.save(donor_state(), path)
    ckpt = ws.open(path)
    path.unlink()
    return (ckpt,), {}


def _plan_from_another_file(tmp_path):
    ws.save(donor_state(), tmp_path / "one.safetensors")
    ws.save(donor_state(), tmp_path / "two.safetensors")
    p = ws.plan(victim(), tmp_path / "one.safetensors")
    return (tmp_path / "two.safetensors",), {"plan": p}


def _plan_and_options(tmp_path):
    ws.save(donor_state(), tmp_path / "one.safetensors")
    p = ws.plan(victim(), tmp_path / "one.safetensors")
    return (tmp_path / "one.safetensors",), {"plan": p, "match": "exact"}


def _failing_init_rule(tmp_path):
    s = donor_state()
    del s["4.weight"], s["4.bias"]  # filled by a rule that cannot be used
    return (s,), {"init": [("4.*", "no_such_initializer")]}


def _second_init_rule_unusable(tmp_path):
    s = donor_state()
    del s["4.weight"], s["4.bias"]  # the first rule is fine, the second is not: neither is applied
    return (s,), {"init": [("4.bias", "zeros"), ("4.weight", "xavier_uniform(gain='x')")]}


def _raising_callable_init(tmp_path):
    s = donor_state()
    del s["4.weight"], s["4.bias"]

    calls = []

    def explode(t):  # fills the first tensor it is given, then fails on the next
        calls.append(t)
        if len(calls) > 1:
            raise RuntimeError("initializer exploded")
        t.fill_(3.0)

    return (s,), {"init": [("4.*", explode)]}


FAILURES = {
    "shape mismatch": (_shape_mismatch, PlanError, "4.weight"),
    "strict: missing": (_missing, PlanError, "missing: 4.weight"),
    "strict: unexpected": (_unexpected, PlanError, "unexpected: source extra.weight"),
    "nothing matches": (_nothing_matches, PlanError, "nothing in"),
    "coverage below min_coverage": (_low_coverage, PlanError, "min_coverage"),
    "a dict whose read fails midway": (_raising_dict, PlanError, "I/O error"),
    "a mapping whose read fails midway": (_raising_mapping, CheckpointError, "I/O error"),
    "a file truncated after open": (_truncated_file, ws.CorruptCheckpointError, r"donor\.safetensors.*cut"),
    "a file deleted after open": (_deleted_file, CheckpointError, "gone"),
    "a plan made from another file": (_plan_from_another_file, PlanError, "another source"),
    "plan= with plan options": (_plan_and_options, PlanError, "not both"),
    "an unknown init rule": (_failing_init_rule, ModelError, "no_such_initializer"),
    "a second init rule that cannot be used": (_second_init_rule_unusable, ModelError, "gain"),
    "a callable initializer that raises": (_raising_callable_init, ModelError, "initializer exploded"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_a_failed_load_changes_nothing(tmp_path, case):
    make, error, text = FAILURES[case]
    args, kwargs = make(tmp_path)
    model = victim()
    snap = snapshot(model)
    assert snap["ties"] == {("1.weight", "3.weight"), ("1.bias", "3.bias")}

    with pytest.raises(error, match=text):
        ws.load_(model, *args, **kwargs)

    assert_untouched(model, snap)


def test_a_file_cut_short_after_it_was_mapped_is_an_error_not_a_crash(tmp_path):
    """Touching mapped pages past a file's new end kills the process; load_ reads them in first."""
    torch.manual_seed(0)
    path = tmp_path / "big.safetensors"
    ws.save(nn.Linear(1024, 256), path)  # 1 MiB of weight: many pages
    ckpt = ws.open(path)
    ckpt.tensor("weight")  # mapped while whole
    os.truncate(path, os.path.getsize(path) // 2)
    model = nn.Linear(1024, 256)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(ws.CorruptCheckpointError, match=r"big\.safetensors.*'weight'.*cut to"):
        ws.load_(model, ckpt)

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Exploding(nn.Linear):
    """A layer whose own loading code fails on its bias, after earlier modules were written."""

    def __init__(self, *args, probe=None):
        super().__init__(*args)
        self.probe = probe
        self.seen = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.seen = self.probe().detach().clone()  # what the model held when this module's turn came
        self.weight.requires_grad_(False)  # loading code may change flags before it fails
        raise RuntimeError(f"cannot load {prefix}bias")


def test_a_module_that_fails_to_load_midway_leaves_the_model_as_it_was(tmp_path):
    torch.manual_seed(0)
    donor = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    donor[1].running_mean.fill_(3.0)
    path = tmp_path / "donor.safetensors"
    ws.save(donor, path)
    torch.manual_seed(1)
    shared = nn.Linear(4, 8)
    model = nn.Sequential(shared, nn.BatchNorm1d(8), Exploding(8, 2, probe=lambda: model[1].running_mean))
    model.extra = shared  # a tie, under another name
    snap = snapshot(model)

    with pytest.raises(ModelError, match="cannot load 2.bias.*put back") as info:
        ws.load_(model, path, strict=False)
    assert isinstance(info.value.__cause__, RuntimeError)  # the module's own error, chained

    assert torch.equal(model[2].seen, torch.full((8,), 3.0))  # the buffer had been written ...
    assert_untouched(model, snap)  # ... and was put back
    assert model.extra is model[0]


# -- what a successful load keeps --------------------------------------------------------------------
def test_an_optimizer_made_before_the_load_still_trains_the_loaded_parameters(tmp_path, src_a):
    path = tmp_path / "a.safetensors"
    ws.save(src_a, path)
    dst = fresh_a()
    opt = torch.optim.SGD(dst.parameters(), lr=0.5)
    ids = {k: id(p) for k, p in dst.named_parameters()}

    ws.load_(dst, path)

    assert {k: id(p) for k, p in dst.named_parameters()} == ids
    assert torch.equal(dst.head.weight, src_a.head.weight)
    dst(X).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(dst.head.weight, src_a.head.weight)
    assert all(p.requires_grad and p.is_leaf for p in dst.parameters())


def test_a_parameter_shared_by_two_modules_stays_shared(tied_lm, tied_lm_file):
    src, path = tied_lm_file
    torch.manual_seed(1)
    dst = tied_lm()
    weight = dst.embed.weight

    report = ws.load_(dst, path)

    assert dst.head.weight is dst.embed.weight is weight
    assert torch.equal(weight, src.embed.weight)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(dst(ids), src(ids))
    assert report.provenance["head.weight"] == "tied to embed.weight"


def test_ties_survive_a_load_and_stay_one_parameter(tmp_path, tied_mlp):
    path = tmp_path / "tied.safetensors"
    ws.save(tied_mlp, path)
    torch.manual_seed(5)
    shared = nn.Linear(8, 8)
    dst = nn.Sequential(nn.Linear(4, 8), shared, nn.ReLU(), shared, nn.Linear(8, 1))

    report = ws.load_(dst, path)

    assert dst[1].weight is dst[3].weight and dst[1] is shared
    assert torch.equal(dst[3].weight, tied_mlp[3].weight)
    assert report.provenance["3.weight"].startswith("tied to 1.weight")
    x = torch.randn(2, 4)
    assert torch.equal(dst(x), tied_mlp(x))


def test_a_float16_checkpoint_is_cast_into_a_float32_model(tmp_path, src_a):
    path = tmp_path / "half.safetensors"
    ws.save({k: v.half() for k, v in src_a.state_dict().items()}, path)
    dst = fresh_a()

    report = ws.load_(dst, path)

    assert dst.conv1.weight.dtype == torch.float32
    assert torch.equal(dst.conv1.weight, src_a.conv1.weight.half().float())
    assert report.provenance["conv1.weight"] == "conv1.weight + cast float16->float32"


class Halved(nn.Linear):
    """A module with its own loading code: it keeps half of the stored weight (as a rescaled layer would)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.given = sorted(k for k in state_dict if k.startswith(prefix))
        state_dict[prefix + "weight"] = state_dict[prefix + "weight"] / 2
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def test_custom_loading_code_and_pre_hooks_see_the_load(tmp_path):
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    path = tmp_path / "src.safetensors"
    ws.save(src, path)
    torch.manual_seed(1)
    dst = nn.Sequential(Halved(4, 4), nn.Linear(4, 2))
    weight = dst[0].weight
    seen = []

    def hook(module, state_dict, prefix, *args):
        seen.append(sorted(k for k in state_dict if k.startswith(prefix)))
        state_dict[prefix + "bias"] = state_dict[prefix + "bias"] * 2  # hooks may rewrite values

    dst[1].register_load_state_dict_pre_hook(hook)

    ws.load_(dst, path)

    assert dst[0].given == ["0.bias", "0.weight"]
    assert torch.equal(dst[0].weight, src[0].weight / 2) and dst[0].weight is weight
    assert seen == [["1.bias", "1.weight"]]
    assert torch.equal(dst[1].bias, src[1].bias * 2)
    assert torch.equal(dst[1].weight, src[1].weight)


def test_a_plan_is_made_once_and_reused(tmp_path, src_a):
    path = tmp_path / "a.safetensors"
    ws.save(src_a, path)
    dst = model_b()
    p = ws.plan(dst, path, rename=[("head", "classifier")], on_mismatch="adapt", match="auto")

    report = ws.load_(dst, path, plan=p)

    assert torch.equal(dst.backbone_conv.weight, src_a.conv1.weight)
    assert torch.equal(dst.classifier.weight[:3], src_a.head.weight)
    assert list(report.provenance) == [s.target for s in p.steps]
    assert report.provenance["backbone_conv.weight"] == "conv1.weight"


def test_the_report_names_each_source_and_transform(tmp_path, src_a):
    path = tmp_path / "a.safetensors"
    ws.save({k: v.half() for k, v in src_a.state_dict().items()}, path)
    report = ws.load_(model_b(), path, rename=[("head", "classifier")], on_mismatch="adapt", match="auto")
    assert report.provenance["backbone_conv.weight"] == "conv1.weight + cast float16->float32"
    assert report.provenance["classifier.weight"].startswith("head.weight + adapt:rows (weight rows 3->5")
    assert report.provenance["classifier.weight"].endswith("cast float16->float32")
    assert report.loaded == 8 and report.filled == 0
    d = json.loads(report.to_json())
    assert d["schema"] == "weightsmith.load/1" and d["provenance"]["norm.bias"].startswith("norm.bias")
    assert "backbone_conv.weight" in str(report)


def test_not_strict_keeps_current_values_and_says_so(tmp_path, src_a):
    path = tmp_path / "a.safetensors"
    ws.save(src_a, path)
    dst = model_b()
    head = dst.classifier.weight.detach().clone()

    report = ws.load_(dst, path, strict=False, match="auto")

    assert torch.equal(dst.classifier.weight, head)
    assert report.provenance["classifier.weight"] == "current value"
    assert report.provenance["classifier.bias"] == "current value"
    assert report.unused == {"head.bias": "no target named 'head.bias'", "head.weight": "no target named 'head.weight'"}
    assert report.filled == 2 and report.loaded == 6


def test_init_rules_fill_missing_keys(tmp_path, src_a):
    path = tmp_path / "a.safetensors"
    ws.save(src_a, path)
    dst = model_b()

    report = ws.load_(dst, path, strict=False, init=[("classifier.weight", "zeros"), ("classifier.bias", "ones")])

    assert torch.equal(dst.classifier.weight, torch.zeros(5, 8))
    assert torch.equal(dst.classifier.bias, torch.ones(5))
    assert report.provenance["classifier.weight"] == "init: zeros"
    assert report.provenance["classifier.bias"] == "init: ones"


def test_init_rules_may_be_callables_in_load_build_and_a_reused_plan(tmp_path, src_a):
    path = tmp_path / "a.safetensors"
    ws.save(src_a, path)

    def sevens(t):
        t.fill_(7.0)

    rules = [("classifier.weight", sevens), ("classifier.bias", lambda t: torch.full_like(t, -1.0))]
    dst = model_b()
    report = ws.load_(dst, path, strict=False, init=rules)
    built, _ = ws.build(model_b, path, strict=False, init=rules)
    plan = ws.plan(model_b(), path, init=rules)
    again = model_b()
    ws.load_(again, path, plan=plan, strict=False)

    for model in (dst, built, again):
        assert torch.equal(model.classifier.weight, torch.full((5, 8), 7.0))
        assert torch.equal(model.classifier.bias, torch.full((5,), -1.0))
    assert report.provenance["classifier.weight"] == "init: sevens"
    assert report.provenance["classifier.bias"] == "init: <lambda>"


def test_strict_accepts_missing_keys_that_an_init_rule_fills(tmp_path, src_a):
    state = {k: v for k, v in src_a.state_dict().items() if not k.startswith("head")}
    dst = fresh_a()
    report = ws.load_(dst, state, init=[("head.*", "zeros")])
    assert torch.equal(dst.head.weight, torch.zeros(3, 8))
    assert torch.equal(dst.conv1.weight, src_a.conv1.weight)
    assert report.provenance["head.bias"] == "init: zeros"


def test_a_live_model_is_a_source_too(src_a):
    dst = fresh_a().eval()
    ws.load_(dst, src_a)
    assert torch.equal(dst(X), src_a(X))
    assert dst.conv1.weight is not src_a.conv1.weight
    assert dst.conv1.weight.untyped_storage().data_ptr() != src_a.conv1.weight.untyped_storage().data_ptr()


def test_a_model_on_the_meta_device_is_sent_to_build(src_a):
    with torch.device("meta"):
        dst = model_a()
    with pytest.raises(ModelError, match="build"):
        ws.load_(dst, src_a.state_dict())


def test_a_backup_is_kept_only_where_writing_can_still_fail():
    """Plain torch modules on one device cannot fail once checked: no second copy of the model."""
    from weightsmith.warmstart.execute import writing_may_fail as _writing_may_fail

    def verdict(model, **kwargs):
        state = model.state_dict(keep_vars=True)
        staged = {k: v.detach().clone() for k, v in state.items() if not k.startswith("2.")}
        return _writing_may_fail(model, staged, state, ws.plan(model, staged, **kwargs))

    plain = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    assert not verdict(plain)
    assert not verdict(plain, init=[("2.*", "zeros")])
    assert verdict(plain, init=[("2.*", lambda t: t.zero_())])  # a callable may raise midway
    hooked = nn.Sequential(nn.Linear(4, 8))
    hooked.register_load_state_dict_pre_hook(lambda *args: None)
    assert verdict(hooked)
    assert verdict(nn.Sequential(Exploding(8, 2, probe=lambda: None)))  # its own loading code


def test_ctrl_c_during_the_write_waits_until_the_model_is_whole(tmp_path):
    """With no backup kept, an interrupt mid-write is held until the last value is in, then raised."""
    import signal

    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    path = tmp_path / "s.safetensors"
    ws.save(source, path)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    copy_ = torch.Tensor.copy_
    interrupted = []

    def copy_then_interrupt(self, src, *args, **kwargs):
        if not interrupted:  # Ctrl-C arrives during the first write
            interrupted.append(True)
            signal.raise_signal(signal.SIGINT)
        return copy_(self, src, *args, **kwargs)

    torch.Tensor.copy_ = copy_then_interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            ws.load_(model, path)
    finally:
        torch.Tensor.copy_ = copy_
    assert interrupted
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


# -- a tie given two values by the source -------------------------------------------------------------
class TiedLM(nn.Module):
    """An embedding and an output head that are one Parameter, as language models tie them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(4, 3)
        self.head = nn.Linear(3, 4, bias=False)
        self.head.weight = self.emb.weight


def _two_values(tmp_path, head_delta: float = 0.25):
    emb = torch.arange(12.0).reshape(4, 3)
    path = tmp_path / "untied.safetensors"
    ws.save({"emb.weight": emb, "head.weight": emb + head_delta}, path)  # two tensors in the file
    return path, emb


def test_a_tie_given_two_different_values_is_refused_naming_both_keys(tmp_path):
    path, _ = _two_values(tmp_path)
    model = TiedLM()
    snap = snapshot(model)
    with pytest.raises(PlanError) as info:
        ws.load_(model, path)
    text = str(info.value)
    assert "'emb.weight'" in text and "'head.weight'" in text and "max |a-b| = 0.25" in text
    assert "tied='first'" in text and "nothing was changed" in text
    assert_untouched(model, snap)


def test_a_tie_given_two_equal_values_loads_as_before(tmp_path):
    path, emb = _two_values(tmp_path, head_delta=0.0)
    model = TiedLM()
    weight = model.emb.weight
    report = ws.load_(model, path)
    assert model.emb.weight is weight and model.head.weight is weight
    assert torch.equal(weight.detach(), emb)
    assert report.provenance["head.weight"] == "tied to emb.weight"


def test_nan_in_the_same_places_counts_as_equal(tmp_path):
    emb = torch.tensor([[float("nan"), 1.0, 2.0]] * 4)
    ws.save({"emb.weight": emb, "head.weight": emb.clone()}, tmp_path / "nan.safetensors")
    model = TiedLM()
    ws.load_(model, tmp_path / "nan.safetensors")
    assert torch.equal(model.emb.weight[:, 1:].detach(), emb[:, 1:])


@pytest.mark.parametrize("tied, delta", [("first", 0.0), ("emb.weight", 0.0), ("head.weight", 0.25),
                                         (["other.key", "head.weight"], 0.25)])
def test_tied_picks_which_value_a_tie_takes(tmp_path, tied, delta):
    path, emb = _two_values(tmp_path)
    model = TiedLM()
    weight = model.emb.weight
    report = ws.load_(model, path, tied=tied)
    assert model.emb.weight is weight and model.head.weight is weight  # same object, still tied
    assert torch.equal(weight.detach(), emb + delta)
    if delta:
        assert report.provenance["emb.weight"] == "head.weight"
        assert "took the value of head.weight" in report.unused["emb.weight"]


def test_tied_must_be_a_key_or_keys():
    with pytest.raises(ws.UsageError, match="tied must be"):
        ws.load_(TiedLM(), {"emb.weight": torch.zeros(4, 3)}, tied=1)


def test_build_and_transfer_refuse_a_tie_given_two_values_too(tmp_path):
    path, emb = _two_values(tmp_path)
    with pytest.raises(PlanError, match="'head.weight'"):
        ws.build(TiedLM, path)
    built, _ = ws.build(TiedLM, path, tied="head.weight")
    assert built.head.weight is built.emb.weight and torch.equal(built.emb.weight.detach(), emb + 0.25)
    target = tmp_path / "tied.pt"
    ws.save(TiedLM(), target)  # the file records the tie
    with pytest.raises(PlanError, match="'head.weight'"):
        ws.transfer(path, target)
    out, _ = ws.transfer(path, target, tied="first")
    assert torch.equal(out["emb.weight"], emb) and out["head.weight"] is out["emb.weight"]


def test_a_dcp_folder_giving_a_tie_two_values_is_refused_and_tied_picks(tmp_path):
    emb = torch.arange(12.0).reshape(4, 3)
    ws.save({"emb.weight": emb, "head.weight": emb - 1}, tmp_path / "ckpt", format="dcp")
    model = TiedLM()
    snap = snapshot(model)
    with pytest.raises(PlanError, match="max \\|a-b\\| = 1"):
        ws.load_(model, tmp_path / "ckpt")
    assert_untouched(model, snap)
    ws.load_(model, tmp_path / "ckpt", tied="head.weight")
    assert torch.equal(model.emb.weight.detach(), emb - 1) and model.head.weight is model.emb.weight


def test_a_tie_compared_in_a_file_cut_short_is_an_error_not_a_crash(tmp_path):
    """The tie check reads both values before the first write: pages gone must raise, not SIGBUS."""
    model = TiedLM()
    model.emb = nn.Embedding(256, 1024)  # 1 MiB each: many pages
    model.head = nn.Linear(1024, 256, bias=False)
    model.head.weight = model.emb.weight
    path = tmp_path / "big.safetensors"
    ws.save({"emb.weight": torch.zeros(256, 1024), "head.weight": torch.ones(256, 1024)}, path)
    ckpt = ws.open(path)
    ckpt.tensor("head.weight")  # mapped while whole
    os.truncate(path, os.path.getsize(path) // 2)
    snap = snapshot(model)
    with pytest.raises(ws.CorruptCheckpointError, match=r"big\.safetensors: tensor '(emb|head)\.weight'"):
        ws.load_(model, ckpt, tied="first")
    assert_untouched(model, snap)
