"""Warm-starting models sharded over 3 ranks (8 rows -> 3, 3, 2): from a single file with renames,
from a one-process DCP folder with a wrapper prefix, and back into a plain model; one rank's
failure fails every rank and leaves every model as it was."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import weightsmith as ws
from _workers import Net, run, warmstart

pytestmark = pytest.mark.dist


def read(tmp: Path, name: str) -> dict:
    return json.loads((tmp / name).read_text())


def plain_net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    tmp = tmp_path_factory.mktemp("warm")
    a = plain_net(10).state_dict()
    source = {"enc.weight": a["a.weight"], "enc.bias": a["a.bias"],
              "proj.weight": a["b.weight"].T.contiguous(), "proj.bias": a["b.bias"],
              "old_head.weight": torch.randn(5, 10), "count": a["count"]}
    ws.save(source, tmp / "source.safetensors")
    ws.save(source, tmp / "source_dcp", format="dcp")
    wrapped = plain_net(11).state_dict()
    ws.save({f"module.{k}": v for k, v in wrapped.items()}, tmp / "plain_dcp", format="dcp")
    ws.save(plain_net(12), tmp / "plain.safetensors")
    run(warmstart, 3, tmp)
    return tmp, source, wrapped


def test_sharded_model_warm_starts_from_a_single_file_with_renames(warm) -> None:
    tmp, source, _ = warm
    got = torch.load(tmp / "warm.pt")
    after, before = got["after"], got["before"]
    assert torch.equal(after["a.weight"], source["enc.weight"])
    assert torch.equal(after["a.bias"], source["enc.bias"])
    assert torch.equal(after["b.weight"], source["proj.weight"].T)  # read whole, transposed, then sliced
    assert torch.equal(after["b.bias"], source["proj.bias"])
    assert torch.equal(after["head.weight"], before["head.weight"])  # the new head keeps its values
    assert not torch.equal(before["a.weight"], after["a.weight"])
    report = read(tmp, "warm_0.json")
    assert report["report"]["loaded"] == 5 and report["report"]["provenance"]["b.weight"].startswith("proj.weight")
    assert "old_head.weight" in report["report"]["unused"]
    assert report["plan_counts"] == {"rule": 4, "exact": 1, "missing": 2}


def test_three_ranks_hold_uneven_shards(warm) -> None:
    tmp, _, _ = warm
    shapes = [read(tmp, f"warm_{r}.json")["local_shapes"] for r in range(3)]
    assert [s["a.weight"] for s in shapes] == [[3, 4], [3, 4], [2, 4]]  # 8 rows over 3 ranks
    assert [s["b.weight"] for s in shapes] == [[10, 3], [10, 3], [10, 2]]  # 8 columns over 3 ranks
    summaries = [read(tmp, f"warm_{r}.json")["summary"] for r in range(3)]
    assert [s["a.weight"]["local"] for s in summaries] == [[3, 4], [3, 4], [2, 4]]
    assert all(s["a.weight"]["shape"] == [8, 4] for s in summaries)


def test_one_process_dcp_with_a_wrapper_prefix_loads_into_three_ranks(warm) -> None:
    tmp, _, wrapped = warm
    got = torch.load(tmp / "warm.pt")["from_dcp"]
    assert got.keys() == wrapped.keys()
    assert all(torch.equal(got[k], wrapped[k]) for k in wrapped)


def test_three_rank_dcp_loads_into_a_plain_model_in_one_process(warm) -> None:
    tmp, _, _ = warm
    after = torch.load(tmp / "warm.pt")["after"]
    model = plain_net(13)
    report = ws.load_(model, tmp / "ckpt3")
    assert report.loaded == 7
    state = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in after)
    layout = ws.open(tmp / "ckpt3").reader.layout
    assert {k for k, chunks in layout.items() if len(chunks) == 3} == {"a.weight", "a.bias", "b.weight", "head.weight",
                                                                   "head.bias"}  # one chunk per rank


def test_a_shape_problem_on_one_rank_fails_every_rank_and_changes_none(warm) -> None:
    tmp, _, _ = warm
    reports = [read(tmp, f"warm_{r}.json") for r in range(3)]
    assert reports[1]["shape_error"]["type"] == "PlanError"
    assert "count: source count has shape [1], the target [2]" in reports[1]["shape_error"]["message"]
    for r in (0, 2):
        assert reports[r]["shape_error"]["type"] == "PlanError"
        assert "rank 1:" in reports[r]["shape_error"]["message"]
        assert "count" in reports[r]["shape_error"]["message"]
    assert all(r["unchanged_after_shape_error"] for r in reports)


def test_a_read_failure_on_one_rank_changes_no_rank(warm) -> None:
    tmp, _, _ = warm
    reports = [read(tmp, f"warm_{r}.json") for r in range(3)]
    assert reports[1]["read_error"]["type"] == "PlanError"
    assert "injected read failure for b.weight" in reports[1]["read_error"]["message"]
    for r in (0, 2):
        assert "staging the load failed on 1 rank(s)" in reports[r]["read_error"]["message"]
        assert "rank 1:" in reports[r]["read_error"]["message"]
    assert all(r["unchanged_after_read_error"] for r in reports)


@pytest.mark.parametrize("source", ["source_dcp", "source.safetensors"])
def test_a_failure_after_every_read_succeeded_writes_no_deferred_read(warm, source: str) -> None:
    tmp, _, _ = warm
    reports = [read(tmp, f"warm_{r}.json") for r in range(3)]
    assert "injected transform failure for b.weight" in reports[1]["deferred_errors"][source]["message"]
    for r in (0, 2):
        assert "staging the load failed on 1 rank(s)" in reports[r]["deferred_errors"][source]["message"]
    assert all(r["unchanged_after_deferred_error"][source] for r in reports)


def test_one_process_loads_a_three_rank_folder_without_assembling_it(warm, monkeypatch, tmp_path) -> None:
    """Chunks go straight toward their targets; a damaged chunk fails the load and changes nothing."""
    import shutil

    from weightsmith.io.dcp import DcpReader

    tmp, _, _ = warm
    after = torch.load(tmp / "warm.pt")["after"]
    assembled = []
    tensor = DcpReader.tensor
    monkeypatch.setattr(DcpReader, "tensor", lambda self, key: assembled.append(key) or tensor(self, key))
    model = plain_net(14)
    ws.load_(model, tmp / "ckpt3")
    assert assembled == []  # every value was read chunk by chunk into its target
    assert all(torch.equal(model.state_dict()[k], after[k]) for k in after)

    damaged = tmp_path / "ckpt3"
    shutil.copytree(tmp / "ckpt3", damaged)
    (chunk,) = [c for c in ws.open(damaged).reader.layout["a.weight"] if c.file == "__2_0.distcp"]
    os.truncate(damaged / chunk.file, chunk.byte_offset + chunk.length // 2)
    victim = plain_net(15)
    before = {k: v.clone() for k, v in victim.state_dict().items()}
    with pytest.raises(ws.CheckpointError, match=r"__2_0\.distcp"):
        ws.load_(victim, damaged)
    assert all(torch.equal(before[k], v) for k, v in victim.state_dict().items())


def test_stats_of_a_sharded_model_are_the_whole_tensors_on_every_rank(warm) -> None:
    """Uneven row and column shards and a replicated bias: moments combined across the 3 ranks."""
    tmp, _, _ = warm
    reports = [read(tmp, f"warm_{r}.json") for r in range(3)]
    whole = {t["key"]: t for t in reports[0]["whole_stats"]["tensors"]}
    for report in reports:
        sharded = {t["key"]: t for t in report["sharded_stats"]["tensors"]}
        assert report["sharded_stats"]["skipped"] == {}
        assert sharded.keys() == whole.keys()
        for key, expected in whole.items():
            got = sharded[key]
            assert got["shape"] == expected["shape"] and got["numel"] == expected["numel"]
            for field in ("mean", "std", "l2"):
                assert got[field] == pytest.approx(expected[field], rel=1e-6, abs=1e-9), (key, field)
            for field in ("min", "max", "zero_fraction", "nan_count"):
                assert got[field] == expected[field], (key, field)


def test_a_nan_one_rank_holds_is_found_on_every_rank(warm) -> None:
    tmp, _, _ = warm
    for r in range(3):
        health = read(tmp, f"warm_{r}.json")["health"]
        assert not health["ok"] and health["checked"] == 7
        assert [(f["key"], f["kind"], f["value"]) for f in health["findings"]] == [("a.weight", "nan", 1)]
