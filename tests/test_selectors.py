"""Selectors: the grammar's bare-word rule and the closest keys named when nothing matches."""

from __future__ import annotations

import pytest
from torch import nn

from weightsmith.errors import SelectorError
from weightsmith.selectors import select

KEYS = {k: None for k in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
                          "encoder.layer.0.attention.self.query.bias", "encoder.layer.0.attention.self.key.weight",
                          "encoder.layer.1.attention.self.query.weight", "pooler.dense.weight")}


def test_a_bare_word_matches_that_segment_anywhere():
    assert select(KEYS, "query") == ["encoder.layer.0.attention.self.query.weight",
                                     "encoder.layer.0.attention.self.query.bias",
                                     "encoder.layer.1.attention.self.query.weight"]
    assert select(KEYS, "pooler") == ["pooler.dense.weight"]  # a root name still selects its subtree
    assert select(KEYS, ["attention", "!bias"]) == ["encoder.layer.0.attention.self.query.weight",
                                                    "encoder.layer.0.attention.self.key.weight",
                                                    "encoder.layer.1.attention.self.query.weight"]
    assert select(KEYS, "quer", allow_empty=True) == []  # a segment, not a substring
    assert select({"0.weight": 1, "10.0.weight": 2}, "0") == ["0.weight"]  # numbers stay anchored


def test_a_bare_word_works_on_a_model():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    assert select(model, "bias") == ["0.bias", "1.0.bias"]


def test_matched_nothing_names_the_closest_keys():
    with pytest.raises(SelectorError) as e:
        select(KEYS, "encoder.layer.*.attention.self.qeury.weight")
    assert str(e.value).startswith(
        "selector 'encoder.layer.*.attention.self.qeury.weight' matched nothing among 6 names "
        "(closest keys: encoder.layer.0.attention.self.query.weight, encoder.layer.1.attention.self.query.weight,")
    with pytest.raises(SelectorError, match=r"\(e\.g\. a, b\)"):
        select({"a": 1, "b": 2}, "zzzzzzzzzz")
