"""`weightsmith warmstart --tied`: what a tie given two values by the source becomes."""

import torch
from click.testing import CliRunner
from torch import nn

import weightsmith
from weightsmith.cli import cli


def test_warmstart_refuses_a_tie_given_two_values_unless_tied_picks_one(tmp_path):
    emb = nn.Embedding(4, 3)
    tied = nn.Module()
    tied.emb, tied.head = emb, nn.Linear(3, 4, bias=False)
    tied.head.weight = emb.weight
    target = tmp_path / "tied.pt"
    weightsmith.save(tied, target)  # the target file records the tie
    source = tmp_path / "untied.safetensors"
    weightsmith.save({"emb.weight": torch.zeros(4, 3), "head.weight": torch.ones(4, 3)}, source)
    out = tmp_path / "out.pt"

    refused = CliRunner().invoke(cli, ["warmstart", str(source), "--into", str(target), "-o", str(out)])
    assert refused.exit_code == 2 and "'head.weight'" in refused.output and "tied='first'" in refused.output
    assert not out.exists()

    picked = CliRunner().invoke(cli, ["warmstart", str(source), "--into", str(target), "-o", str(out),
                                      "--tied", "head.weight"], catch_exceptions=False)
    assert picked.exit_code == 0, picked.output
    assert torch.equal(weightsmith.open(out).load()["emb.weight"], torch.ones(4, 3))
