"""A sharded load checks ties given two values before any rank writes, as `load_` does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import weightsmith as ws
from _tie_workers import tied_load
from _workers import run

pytestmark = pytest.mark.dist


def test_a_sharded_tie_given_two_values_is_refused_on_every_rank_and_tied_picks(tmp_path: Path) -> None:
    emb = torch.arange(32.0).reshape(8, 4)
    ws.save({"emb.weight": emb, "head.weight": emb + 0.5}, tmp_path / "untied.safetensors")
    run(tied_load, 2, tmp_path)
    for rank in range(2):
        got = json.loads((tmp_path / f"tied_{rank}.json").read_text())
        assert got["error"]["type"] == "PlanError" and "max |a-b| = 0.5" in got["error"]["message"]
        assert got["unchanged"] and got["still_tied"]
        assert torch.equal(torch.tensor(got["after"]), emb + 0.5)
