"""Save a sharded model with 4 ranks, load it with 2 and with 1: bit-identical tensors, uneven and
empty shards included; a data file truncated where only one rank reads fails every rank."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import weightsmith as ws
from _workers import Net, load_resharded, placements, run, save_sharded
from weightsmith.distributed import WeightsmithDcpReader

pytestmark = pytest.mark.dist


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(bits(got[k]), bits(want[k])), k


def read(tmp: Path, name: str) -> dict:
    return json.loads((tmp / name).read_text())


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("reshard")
    run(save_sharded, 4, tmp)
    return tmp


@pytest.fixture(scope="module")
def loaded(saved: Path) -> Path:
    run(load_resharded, 2, saved)
    return saved


def test_four_ranks_write_their_own_shards(saved: Path) -> None:
    report = read(saved, "save_0.json")["report"]
    assert report["format"] == "dcp" and report["tensors"] == 7
    names = sorted(Path(f).name for f in report["files"])
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp"]
    layout = ws.open(saved / "ckpt").reader.layout
    assert [(c.offsets, c.sizes, c.file) for c in layout["a.weight"]] == [
        ((2 * r, 0), (2, 4), f"__{r}_0.distcp") for r in range(4)]
    assert [c.sizes for c in layout["b.weight"]] == [(10, 2)] * 4  # Shard(1): columns
    assert [c.sizes for c in layout["head.weight"]] == [(1, 10), (1, 10), (1, 10), (0, 10)]  # rank 3 empty
    assert len(layout["b.bias"]) == 1  # replicated on every rank, stored once
    assert sorted(p.name for p in saved.iterdir() if p.name.startswith(".ckpt")) == []  # no staging left


def test_inspect_layout_shows_each_chunk_file_and_region(saved: Path) -> None:
    from weightsmith.listing import list_checkpoint

    listing = list_checkpoint(ws.open(saved / "ckpt"), layout=True)
    rows = {r.key: r.stored_in for r in listing.rows}
    assert rows["a.weight"] == tuple(f"__{r}_0.distcp [{2 * r}:{2 * r + 2}, 0:4]" for r in range(4))
    assert rows["b.weight"] == tuple(f"__{r}_0.distcp [0:10, {2 * r}:{2 * r + 2}]" for r in range(4))
    assert len(rows["head.weight"]) == 3  # rank 3's chunk is empty and not listed
    assert "stored in" in str(listing) and "__3_0.distcp [6:8, 0:4]" in str(listing)


def test_async_save_with_a_process_group_writes_the_same_tensors(saved: Path) -> None:
    assert read(saved, "save_0.json")["async_report"]["tensors"] == 7
    reference = torch.load(saved / "reference.pt")
    assert_same(ws.open(saved / "ckpt_async").load(), reference)


def test_two_ranks_load_four_rank_shards_bit_identical(loaded: Path) -> None:
    reference = torch.load(loaded / "reference.pt")
    both = torch.load(loaded / "loaded_2.pt")
    assert_same(both["sync"], reference)
    assert_same(both["async"], reference)
    shapes = [read(loaded, f"load_2_{r}.json")["local_shapes"] for r in range(2)]
    assert [s["a.weight"] for s in shapes] == [[4, 4], [4, 4]]
    assert [s["b.weight"] for s in shapes] == [[10, 4], [10, 4]]
    assert [s["head.weight"] for s in shapes] == [[2, 10], [1, 10]]  # 3 rows over 2 ranks
    assert read(loaded, "load_2_0.json")["report"]["loaded"] == 7
    assert all(read(loaded, f"load_2_{r}.json")["same_params"] for r in range(2))  # the same Parameters


def test_an_fsdp2_model_loads_and_still_trains(loaded: Path) -> None:
    reference = torch.load(loaded / "reference.pt")
    got = torch.load(loaded / "loaded_2.pt")
    assert_same(got["fsdp"], reference)
    assert not torch.equal(got["fsdp_stepped"]["a.weight"], reference["a.weight"])


def test_stats_of_an_fsdp2_model_are_its_whole_tensors(loaded: Path) -> None:
    for r in range(2):
        got = read(loaded, f"load_2_{r}.json")["fsdp_stats"]
        whole = {t["key"]: t for t in got["whole"]}
        assert [t["key"] for t in got["sharded"]] == list(whole)
        for t in got["sharded"]:
            assert t["numel"] == whole[t["key"]]["numel"]
            assert t["mean"] == pytest.approx(whole[t["key"]]["mean"], rel=1e-6, abs=1e-9)
            assert t["std"] == pytest.approx(whole[t["key"]]["std"], rel=1e-6, abs=1e-9)
            assert (t["min"], t["max"]) == (whole[t["key"]]["min"], whole[t["key"]]["max"])


def test_one_process_reads_the_four_rank_folder(saved: Path) -> None:
    import torch.distributed.checkpoint as dcp

    reference = torch.load(saved / "reference.pt")
    ckpt = ws.open(saved / "ckpt")
    assert_same(ckpt.load(), reference)
    torch.manual_seed(9)
    plain = Net()
    weight = plain.a.weight
    ws.load_(plain, saved / "ckpt")
    assert_same(plain.state_dict(), reference)
    assert plain.a.weight is weight
    through_dcp = {k: torch.zeros_like(v) for k, v in reference.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(through_dcp, storage_reader=WeightsmithDcpReader(str(saved / "ckpt")), no_dist=True)
    assert_same(through_dcp, reference)


def test_a_truncated_chunk_one_rank_reads_fails_every_rank_and_changes_none(loaded: Path) -> None:
    reports = [read(loaded, f"load_2_{r}.json") for r in range(2)]
    mine, other = reports[1]["truncated_error"], reports[0]["truncated_error"]
    assert mine["type"] == "CorruptCheckpointError"
    assert "__3_0.distcp" in mine["message"] and "'b.weight'" in mine["message"] and "truncated" in mine["message"]
    assert other["type"] == "CheckpointError"
    assert "rank 1" in other["message"] and "nothing was changed on any rank" in other["message"]
    assert all(r["unchanged_after_truncated"] for r in reports)


def test_summary_of_a_sharded_model_gives_global_and_per_rank_shapes(saved: Path) -> None:
    rows = [read(saved, f"save_{r}.json")["summary"] for r in range(4)]
    assert all(r["a.weight"]["shape"] == [8, 4] and r["a.weight"]["count"] == 32 for r in rows)
    assert [r["a.weight"]["local"] for r in rows] == [[2, 4]] * 4
    assert [r["head.weight"]["local"] for r in rows] == [[1, 10]] * 3 + [[0, 10]]
    assert [r["b.bias"]["local"] for r in rows] == [[10]] * 4  # replicated: whole on every rank
    assert rows[0]["count"]["local"] == []  # a plain buffer has no shard
    assert "(3, 10) local (0, 10)" in read(saved, "save_3.json")["summary_text"]
    assert set(placements()) == {k for k in rows[0] if k != "count"}


def test_stats_count_a_piece_replicated_over_a_mesh_dimension_once(saved: Path) -> None:
    for r in range(4):
        report = read(saved, f"save_{r}.json")
        (got,), (whole,) = report["grid_stats"], report["grid_whole"]
        assert got["numel"] == whole["numel"] == 30
        for field in ("mean", "std", "l2"):
            assert got[field] == pytest.approx(whole[field], rel=1e-6), field
        assert (got["min"], got["max"]) == (whole["min"], whole["max"])
