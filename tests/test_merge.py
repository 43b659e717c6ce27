"""merge_plan and merge: alignment, problems before any read, outputs, and nothing lost."""

import hashlib
import importlib
import json

import pytest
import torch
from torch import nn

import weightsmith as ws
from weightsmith.checkpoint import Checkpoint
from weightsmith.errors import PlanError


def _state(seed, prefix="", layers=2):
    g = torch.Generator().manual_seed(seed)
    s = {"embed.weight": torch.randn(10, 4, generator=g)}
    for i in range(layers):
        s[f"blocks.{i}.attn.weight"] = torch.randn(4, 4, generator=g)
        s[f"blocks.{i}.mlp.weight"] = torch.randn(4, 4, generator=g)
    s["norm.num_batches_tracked"] = torch.tensor(100 + seed)
    return {prefix + k: v for k, v in s.items()}


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def wrapped(tmp_path):
    """A DDP-prefixed, a compiled and a plain checkpoint of one architecture."""
    paths = []
    for i, prefix in enumerate(["module.", "_orig_mod.", ""]):
        p = tmp_path / f"m{i}.safetensors"
        ws.save(_state(i, prefix), p)
        paths.append(p)
    return paths


def test_mixed_wrappers_merge_without_any_rule(wrapped, tmp_path):
    out = tmp_path / "soup.safetensors"
    report = ws.merge(wrapped, out)
    got = ws.open(out).load()
    plain = [_state(i) for i in range(3)]
    assert set(got) == set(plain[0])  # named without the wrappers
    torch.testing.assert_close(got["blocks.1.mlp.weight"], sum(s["blocks.1.mlp.weight"] for s in plain) / 3)
    assert report.counts == {"merge": 5, "copy": 1}


def test_integer_buffers_are_copied_from_the_first_input_and_the_plan_says_so(wrapped, tmp_path):
    plan = ws.merge_plan(wrapped, method="linear")
    step = next(s for s in plan.steps if s.key == "norm.num_batches_tracked")
    assert step.how == "copy" and step.reads == ((0, "module.norm.num_batches_tracked"),)
    assert "not averaged" in str(plan)
    ws.merge(wrapped, tmp_path / "o.safetensors")
    assert int(ws.open(tmp_path / "o.safetensors").tensor("norm.num_batches_tracked")) == 100


def test_integer_buffers_come_from_the_base_when_there_is_one(wrapped, tmp_path):
    ws.merge(wrapped[1:], tmp_path / "o.safetensors", method="task_arithmetic", base=wrapped[0])
    assert int(ws.open(tmp_path / "o.safetensors").tensor("norm.num_batches_tracked")) == 100


def test_plan_lists_every_problem_from_headers_alone(tmp_path, monkeypatch):
    a, b = _state(0), _state(1)
    del b["blocks.1.mlp.weight"]
    b["blocks.0.attn.weight"] = torch.randn(4, 5)
    b["embed.weight"] = torch.zeros(10, 4, dtype=torch.int64)
    b["extra.bias"] = torch.zeros(3)
    ws.save(a, tmp_path / "a.safetensors")
    ws.save(b, tmp_path / "b.safetensors")
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]

    def no_reads(self, key, **kw):
        raise AssertionError(f"read {key} while planning")

    monkeypatch.setattr(Checkpoint, "tensor", no_reads)
    plan = ws.merge_plan(paths, method="ties", density=0.5)
    text = "\n".join(plan.problems)
    assert "blocks.1.mlp.weight: missing from #1" in text
    assert "blocks.0.attn.weight: shape [4, 5] in #1" in text
    assert "embed.weight: dtype int64 in #1" in text
    assert "extra.bias: in #1" in text
    assert "ties needs a base model" in text
    assert plan.verdict().startswith("cannot merge")
    assert json.loads(plan.to_json())["schema"] == "weightsmith.merge-plan/1"
    out = tmp_path / "out.safetensors"
    with pytest.raises(PlanError) as e:  # refused before any tensor is read (reads would assert)
        ws.merge(paths, out, method="ties", density=0.5)
    assert len(e.value.problems) == len(plan.problems)
    assert not out.exists()


@pytest.mark.parametrize("method,kw,needle", [
    ("slerp", {}, "slerp takes exactly two"),
    ("ties", {"base": "B"}, "ties needs density="),
    ("linear", {"weights": [1.0]}, "weights has 1 value(s) for 3 input(s)"),
    ("model_stock", {}, "model_stock needs a base"),
])
def test_method_requirements_are_plan_problems(wrapped, method, kw, needle):
    if kw.get("base") == "B":
        kw["base"] = wrapped[0]
    plan = ws.merge_plan(wrapped, method=method, **kw)
    assert any(needle in p for p in plan.problems), plan.problems


def test_unknown_or_misplaced_parameters_are_refused(wrapped):
    with pytest.raises(ws.UsageError, match="unknown merge parameter"):
        ws.merge_plan(wrapped, method="linear", densty=0.5)
    with pytest.raises(ws.UsageError, match="linear takes no t"):
        ws.merge_plan(wrapped, method="linear", t=0.5)
    with pytest.raises(ws.UsageError, match="unknown merge method"):
        ws.merge_plan(wrapped, method="average")


def test_per_selector_parameters_and_a_gradient_over_layers(tmp_path):
    a, b = _state(0, layers=3), _state(1, layers=3)
    plan = ws.merge_plan([a, b], method="slerp", t=[("**.attn.**", [0.0, 1.0]), ("**", 0.5)])
    t = {s.key: s.params.get("t") for s in plan.steps}
    assert t["blocks.0.attn.weight"] == 0.0 and t["blocks.1.attn.weight"] == 0.5 and t["blocks.2.attn.weight"] == 1.0
    assert t["blocks.2.mlp.weight"] == 0.5 and t["embed.weight"] == 0.5
    model = nn.Module()
    for k, v in a.items():
        model.register_buffer(k.replace(".", "_"), v.clone())
    got = {}
    out = tmp_path / "s.safetensors"
    ws.merge([a, b], out, method="slerp", t=[("**.attn.**", [0.0, 1.0]), ("**", 0.5)])
    got = ws.open(out).load()
    torch.testing.assert_close(got["blocks.0.attn.weight"], a["blocks.0.attn.weight"])
    torch.testing.assert_close(got["blocks.2.attn.weight"], b["blocks.2.attn.weight"])


def test_a_selector_list_without_catch_all_is_a_problem():
    a, b = _state(0), _state(1)
    plan = ws.merge_plan([a, b], method="slerp", t=[("**.attn.**", 0.3)])
    assert any("parameter t: no selector matches" in p for p in plan.problems)


def test_weights_per_selector():
    a, b = _state(0), _state(1)
    plan = ws.merge_plan([a, b], method="linear", weights=[[("embed", 1.0), ("**", 0.0)], 1.0])
    w = {s.key: s.params["weights"] for s in plan.steps if s.how == "merge"}
    assert w["embed.weight"] == [1.0, 1.0] and w["blocks.0.mlp.weight"] == [0.0, 1.0]


def test_tied_pair_is_merged_once_and_stays_tied(tmp_path):
    paths = []
    for i in range(2):
        s = _state(i)
        s["head.weight"] = s["embed.weight"]  # tied
        p = tmp_path / f"t{i}.safetensors"
        ws.save(s, p)
        paths.append(p)
    plan = ws.merge_plan(paths, method="linear")
    assert [s.how for s in plan.steps if s.key == "head.weight"] == ["tied"]
    ws.merge(paths, tmp_path / "o.safetensors")
    out = ws.open(tmp_path / "o.safetensors")
    assert ("embed.weight", "head.weight") in [tuple(sorted(g)) for g in out.ties]


def test_passthrough_stacks_layer_ranges(tmp_path):
    a, b = _state(0, layers=4), _state(1, layers=4)
    out = tmp_path / "deep.safetensors"
    ws.merge([a, b], out, method="passthrough", slices=[(0, 0, 2), (1, 1, 4)])
    got = ws.open(out).load()
    assert sorted({int(k.split(".")[1]) for k in got if k.startswith("blocks.")}) == [0, 1, 2, 3, 4]
    assert torch.equal(got["blocks.1.mlp.weight"], a["blocks.1.mlp.weight"])
    assert torch.equal(got["blocks.2.mlp.weight"], b["blocks.1.mlp.weight"])
    assert torch.equal(got["blocks.4.attn.weight"], b["blocks.3.attn.weight"])
    assert torch.equal(got["embed.weight"], a["embed.weight"])


def test_passthrough_slice_past_the_last_layer_is_a_problem():
    plan = ws.merge_plan([_state(0), _state(1)], method="passthrough", slices=[(1, 0, 3)])
    assert any("has no layer 2" in p for p in plan.problems)


def test_failed_merge_leaves_output_and_inputs_as_they_were(wrapped, tmp_path, monkeypatch):
    run = importlib.import_module("weightsmith.merging.run")

    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous")
    before = [_digest(p) for p in wrapped]
    calls = []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*a, **kw)

    real = run.combine
    monkeypatch.setattr(run, "combine", failing)
    with pytest.raises(ws.SaveError, match="previous file is intact"):
        ws.merge(wrapped, out)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0.safetensors", "m1.safetensors", "m2.safetensors",
                                                          "out.safetensors"]
    assert [_digest(p) for p in wrapped] == before


def test_inputs_are_never_modified_state_dicts_included(tmp_path):
    a, b = _state(0), _state(1)
    copies = [{k: v.clone() for k, v in s.items()} for s in (a, b)]
    for method, kw in [("ties", {"density": 0.5}), ("task_arithmetic", {}), ("dare_ties", {"density": 0.5})]:
        ws.merge([b], tmp_path / f"{method}.safetensors", method=method, base=a, **kw)
    for s, c in zip((a, b), copies):
        assert all(torch.equal(s[k], c[k]) for k in s)


def test_writing_over_an_input_is_refused(wrapped):
    with pytest.raises(ws.UsageError, match="one of the inputs"):
        ws.merge(wrapped, wrapped[0])


def test_sharded_torch_and_dtype_outputs(wrapped, tmp_path):
    r = ws.merge(wrapped, tmp_path / "shards", max_shard_size=200, dtype="bfloat16")
    assert r.format == "sharded" and len(r.files) > 2
    sharded = ws.open(tmp_path / "shards")
    assert sharded["blocks.0.attn.weight"].dtype == "bfloat16"
    assert sharded["norm.num_batches_tracked"].dtype == "int64"
    ws.merge(wrapped, tmp_path / "o.pt")
    pt = ws.open(tmp_path / "o.pt").load()
    torch.testing.assert_close(pt["embed.weight"], sharded.tensor("embed.weight").float(), atol=0.02, rtol=0.02)


def test_merge_into_a_model_is_all_or_nothing(tmp_path):
    class Net(nn.Module):
        def __init__(self, width=4):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.blocks = nn.ModuleList(nn.ModuleDict({"attn": nn.Linear(4, width, bias=False),
                                                       "mlp": nn.Linear(width, 4, bias=False)}) for _ in range(2))
            self.norm = nn.BatchNorm1d(4)

    a, b = Net().state_dict(), Net().state_dict()
    model = Net()
    report = ws.merge([a, b], model)
    assert report.format == "model"
    torch.testing.assert_close(model.blocks[1].mlp.weight, (a["blocks.1.mlp.weight"] + b["blocks.1.mlp.weight"]) / 2)
    wide = Net(width=5)
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(ws.WeightsmithError):
        ws.merge([a, b], wide)
    assert all(torch.equal(v, before[k]) for k, v in wide.state_dict().items())


def test_progress_reaches_the_total(wrapped, tmp_path):
    seen = []
    ws.merge(wrapped, tmp_path / "o.safetensors", progress=lambda d, t, k: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] > 0


def test_a_bert_classifier_checkpoint_merges_with_the_bare_encoder(minilm_dir, tmp_path):
    """mergekit refuses BERT (no architecture definition) and `bert.` prefixes; no rule is needed here."""
    encoder = minilm_dir / "model.safetensors"
    base = ws.open(encoder)
    # a classifier's checkpoint: `bert.`-prefixed, fine-tuned, a head, and no position_ids buffer
    tuned = {f"bert.{k}": base.tensor(k) + 0.01 for k in base if k != "embeddings.position_ids"}
    plan = ws.merge_plan([encoder, tuned], method="linear", weights=[0.75, 0.25])
    assert plan.problems == [] and plan.prefixes[1] == "strip 'bert.'"
    ws.merge([encoder, tuned], tmp_path / "m.safetensors", weights=[0.75, 0.25])
    got = ws.open(tmp_path / "m.safetensors")
    assert set(got) == set(base)
    key = "encoder.layer.3.output.dense.weight"
    torch.testing.assert_close(got.tensor(key), base.tensor(key) + 0.0025)
    assert torch.equal(got.tensor("embeddings.position_ids"), base.tensor("embeddings.position_ids"))


def test_merged_files_are_what_other_tools_expect_and_a_model_folder_keeps_its_files(wrapped, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "soup.safetensors"
    ws.merge(wrapped, out)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["format"] == "pt"  # transformers 4.x refuses a file without it
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    ws.merge(wrapped, folder, max_shard_size=200)
    assert (folder / "config.json").read_text() == "{}" and (folder / "tokenizer.json").exists()
    assert (folder / "model.safetensors.index.json").exists()
