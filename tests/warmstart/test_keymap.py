"""keymap: wrapper prefixes, rename rules with captures and regexes, tensor transforms, rules files."""

import json

import pytest
import torch

from weightsmith import Rule, SelectorError, WeightsmithError, load_rules
from weightsmith.warmstart.keymap import PrefixMap, align_prefixes, as_rules, natural_key
from weightsmith.warmstart.transforms import apply_transform, parse_transforms

PLAIN = ["0.weight", "0.bias", "2.weight", "2.bias"]


# -- prefixes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module.", "model.",
                                    "base_model.model.", "bert."])
def test_a_prefix_on_every_source_key_is_stripped(prefix):
    pm = align_prefixes([prefix + k for k in PLAIN], PLAIN)
    assert pm == PrefixMap(strip=prefix)
    assert [pm(prefix + k) for k in PLAIN] == PLAIN


def test_a_prefix_on_the_target_is_added():
    pm = align_prefixes(PLAIN, ["bert." + k for k in PLAIN] + ["classifier.weight", "classifier.bias"])
    assert pm == PrefixMap(add="bert.")
    assert pm("0.weight") == "bert.0.weight"


def test_one_wrapper_swapped_for_another():
    pm = align_prefixes(["module." + k for k in PLAIN], ["_orig_mod." + k for k in PLAIN])
    assert pm == PrefixMap(strip="module.", add="_orig_mod.")


def test_matching_names_need_no_prefix_even_when_one_is_shared():
    keys = ["encoder.0.weight", "encoder.0.bias", "encoder.1.weight"]
    assert align_prefixes(keys, keys) == PrefixMap()
    assert PrefixMap().describe() == "none"
    assert PrefixMap("module.", "").describe() == "strip 'module.'"


def test_a_source_key_without_the_prefix_is_kept():
    pm = align_prefixes(["bert." + k for k in PLAIN] + ["classifier.weight"], PLAIN)
    assert pm("classifier.weight") == "classifier.weight"


def test_renaming_one_module_is_not_taken_for_a_prefix():
    # "strip 'q.', add 'qk.'" would make two keys match, but it is a rename, for a rule to say
    assert align_prefixes(["q.weight", "q.bias", "k.weight", "k.bias"], ["qk.weight", "qk.bias"]) == PrefixMap()
    assert align_prefixes(["conv1.weight", "conv1.bias", "fc.weight", "fc.bias", "head.weight", "head.bias"],
                          ["backbone_conv.weight", "backbone_conv.bias", "fc.weight", "fc.bias"]) == PrefixMap()


def test_a_known_wrapper_may_cover_only_part_of_the_target():
    target = ["backbone." + k for k in PLAIN] + [f"head.{i}.weight" for i in range(10)]
    assert align_prefixes(PLAIN, target) == PrefixMap(add="backbone.")


def test_natural_order_puts_layer_2_before_layer_10():
    keys = ["layer.10.weight", "layer.2.weight", "layer.1.bias", "head.weight"]
    assert sorted(keys, key=natural_key) == ["head.weight", "layer.1.bias", "layer.2.weight", "layer.10.weight"]


# -- rules --------------------------------------------------------------------------------------
def test_a_segment_capture_renames_every_tensor_under_the_module():
    rule = Rule("encoder.layer.{i}.attention.self.query", "blocks.{i}.attn.q")
    assert rule.rename("encoder.layer.11.attention.self.query.weight") == "blocks.11.attn.q.weight"
    assert rule.rename("encoder.layer.3.attention.self.query.bias") == "blocks.3.attn.q.bias"
    assert rule.rename("encoder.layer.3.attention.self.key.bias") is None
    # whole segments only: "query2" is not "query"
    assert rule.rename("encoder.layer.3.attention.self.query2.bias") is None


def test_several_captures_can_be_reordered():
    rule = Rule("stage.{s}.block.{b}", "blocks.{b}.in_stage.{s}")
    assert rule.rename("stage.1.block.4.conv.weight") == "blocks.4.in_stage.1.conv.weight"
    # a capture may sit inside a segment, but never spans a dot
    rule = Rule("stage{s}.block{b}", "blocks.{b}.stage.{s}")
    assert rule.rename("stage1.block4.conv.weight") == "blocks.4.stage.1.conv.weight"
    assert rule.rename("stage1.x.block4.conv.weight") is None


def test_a_regex_rule_uses_groups_in_its_replacement():
    rule = Rule(r"re:^h\.(\d+)\.mlp\.c_fc", r"blocks.\1.fc")
    assert rule.rename("h.7.mlp.c_fc.weight") == "blocks.7.fc.weight"
    assert rule.rename("h.7.mlp.c_proj.weight") is None


def test_a_fused_rule_lists_every_source_and_a_split_rule_every_target():
    fuse = Rule(("a.{i}.q", "a.{i}.k", "a.{i}.v"), "b.{i}.qkv", "cat(0)")
    caps, suffix = fuse.match("a.2.k.bias", 1)
    assert fuse.source_names(caps, suffix) == ("a.2.q.bias", "a.2.k.bias", "a.2.v.bias")
    assert fuse.target_names(caps, suffix) == ("b.2.qkv.bias",)
    assert fuse.rename("a.2.q.bias") is None  # not one-to-one
    split = Rule("b.{i}.qkv", ("a.{i}.q", "a.{i}.k", "a.{i}.v"), "chunk(3, 0)")
    caps, suffix = split.match("b.0.qkv.weight")
    assert split.target_names(caps, suffix) == ("a.0.q.weight", "a.0.k.weight", "a.0.v.weight")


def test_rules_come_from_tuples_mappings_and_rule_objects():
    rules = as_rules([("conv1", "backbone_conv"), {"source": ["q", "k"], "target": "qk", "transform": "cat(0)"},
                      Rule("x", "y")])
    assert rules[0] == Rule("conv1", "backbone_conv")
    assert rules[1].sources == ("q", "k") and str(rules[1].transforms[0]) == "cat(0)"
    assert as_rules({"a": "b"}) == (Rule("a", "b"),)
    assert as_rules(None) == ()


# -- malformed rules ------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: Rule(("a", "b"), "c"),                          # several sources without cat
    lambda: Rule(("a", "b"), ("c", "d"), "cat(0)"),         # many to many
    lambda: Rule("a..b", "c"),                              # empty segment
    lambda: Rule("a.{1x}", "c"),                            # capture that is no name
    lambda: Rule("re:(", "c"),                              # regex that does not compile
    lambda: Rule(r"re:^a\.(\d+)", r"b.\2"),                 # replacement naming a missing group
    lambda: Rule(("re:a", "re:b"), "c", "cat(0)"),          # a regex rule has one source
    lambda: Rule("a.{i}.b.{i}", "c.{i}"),                   # one capture name twice
    lambda: Rule("a", 3),                                   # not a pattern
    lambda: Rule("a.{i}", "b.{j}").rename("a.1.weight"),    # target uses an uncaptured name
    lambda: as_rules([("only-one",)]),
    lambda: as_rules([{"source": "a"}]),
    lambda: as_rules(42),
])
def test_malformed_rules_raise_a_selector_error(make):
    with pytest.raises(SelectorError):
        make()


@pytest.mark.parametrize("transform", ["frobnicate", "chunk(3,", "chunk(__import__('os'))", "cat(0) | nope"])
def test_bad_transforms_raise_a_weightsmith_error_without_running_code(transform):
    with pytest.raises(WeightsmithError, match="transform"):
        Rule("a", "b", transform)


# -- transforms -----------------------------------------------------------------------------------
def test_transforms_parse_and_chain():
    trs = parse_transforms("transpose | chunk(3, 0)")
    assert [str(t) for t in trs] == ["transpose", "chunk(3, 0)"]
    w = torch.arange(24.0).reshape(4, 6)  # a Conv1D-style [in, 3*out] weight
    assert torch.equal(apply_transform([w], trs, index=1), w.t()[2:4])
    assert parse_transforms("") == ()


def test_cat_fuses_and_chunk_splits_back():
    q, k, v = (torch.randn(4, 3) for _ in range(3))
    qkv = apply_transform([q, k, v], parse_transforms("cat(0)"))
    assert qkv.shape == (12, 3)
    for i, part in enumerate((q, k, v)):
        assert torch.equal(apply_transform([qkv], parse_transforms("chunk(3, 0)"), index=i), part)


def test_slice_reshape_and_permute():
    x = torch.arange(24.0)
    assert torch.equal(apply_transform([x], parse_transforms("slice(0, 4, 8)")), x[4:8])
    y = apply_transform([x], parse_transforms("reshape(2, 3, 4) | permute(2, 0, 1)"))
    assert torch.equal(y, x.reshape(2, 3, 4).permute(2, 0, 1))


def test_several_sources_without_cat_are_refused():
    with pytest.raises(WeightsmithError, match="cat"):
        apply_transform([torch.ones(2), torch.ones(2)], parse_transforms("transpose"))
    with pytest.raises(WeightsmithError, match="cat"):
        apply_transform([torch.ones(2), torch.ones(2)], ())


# -- rules files ----------------------------------------------------------------------------------
TOML = """
[[rename]]
source = "encoder.layer.{i}.attention.self.query"
target = "blocks.{i}.attn.q"

[[rename]]
source = ["a.{i}.q", "a.{i}.k", "a.{i}.v"]
target = "b.{i}.qkv"
transform = "cat(0)"

[[rename]]
source = 're:^h\\.(\\d+)\\.c_fc\\.weight$'
target = 'blocks.\\1.fc.weight'
transform = "transpose"
"""


def test_rules_from_a_toml_file(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(TOML)
    rules = load_rules(path)
    assert len(rules) == 3
    assert rules[0].rename("encoder.layer.5.attention.self.query.weight") == "blocks.5.attn.q.weight"
    assert rules[1].sources == ("a.{i}.q", "a.{i}.k", "a.{i}.v") and rules[1].targets == ("b.{i}.qkv",)
    assert rules[2].rename("h.3.c_fc.weight") == "blocks.3.fc.weight"
    assert [str(t) for t in rules[2].transforms] == ["transpose"]


def test_rules_from_a_json_file_as_a_list_or_under_rename(tmp_path):
    items = [{"source": "conv1", "target": "backbone_conv"},
             {"source": "qkv", "target": ["q", "k", "v"], "transform": "chunk(3, 0)"}]
    for i, data in enumerate((items, {"rename": items})):
        path = tmp_path / f"rules{i}.json"
        path.write_text(json.dumps(data))
        rules = load_rules(path)
        assert rules[0].rename("conv1.weight") == "backbone_conv.weight"
        assert rules[1].targets == ("q", "k", "v")
    assert as_rules(str(path)) == rules  # a path given as rename= reads the file


@pytest.mark.parametrize("name, text", [
    ("bad.toml", "[[rename]\nsource = 'a'"),                              # not TOML
    ("bad.json", "[{'source': 'a'}"),                                       # not JSON
    ("obj.json", '{"rules": 3, "rename": 3}'),                              # not a list
    ("nosrc.toml", "[[rename]]\ntarget = 'b'\n"),                          # no source
    ("num.json", '[{"source": 3, "target": "b"}]'),                         # source not a string
    ("item.json", '["conv1"]'),                                             # an item that is no table
    ("regex.toml", "[[rename]]\nsource = 're:('\ntarget = 'b'\n"),        # regex does not compile
    ("tr.toml", "[[rename]]\nsource = 'a'\ntarget = 'b'\ntransform = 'explode'\n"),
])
def test_malformed_rules_files_raise_weightsmith_errors_naming_the_problem(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(WeightsmithError):
        load_rules(path)


def test_a_missing_rules_file_is_a_weightsmith_error(tmp_path):
    with pytest.raises(WeightsmithError, match="rules file"):
        load_rules(tmp_path / "absent.toml")


def test_bad_transforms_and_rules_files_are_usage_errors(tmp_path):
    from weightsmith import UsageError, load_rules

    with pytest.raises(UsageError, match="unknown tensor transform 'explode'"):
        parse_transforms("explode")
    with pytest.raises(UsageError, match="bad arguments"):
        parse_transforms("chunk(3,,)")
    with pytest.raises(UsageError, match="cannot read the rules file"):
        load_rules(tmp_path / "missing.json")
    (tmp_path / "rules.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid json"):
        load_rules(tmp_path / "rules.json")
