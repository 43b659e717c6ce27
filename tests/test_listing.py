"""The parameter table: totals with ties counted once, folding, filtering, sorting, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import weightsmith as ws
from weightsmith.errors import SelectorError
from weightsmith.listing import Listing, fold_name, human_bytes, list_checkpoint


@pytest.fixture
def layered(tmp_path: Path) -> Path:
    """Three layers of one family plus a head, saved as safetensors."""
    torch.manual_seed(0)
    sd = {}
    for i in range(3):
        sd[f"layers.{i}.mlp.weight"] = torch.randn(6, 4)
        sd[f"layers.{i}.mlp.bias"] = torch.randn(6)
    sd["layers.2.extra"] = torch.zeros(2, dtype=torch.float16)
    sd["head.weight"] = torch.randn(10, 6)
    path = tmp_path / "layered.safetensors"
    ws.save(sd, path)
    return path


def test_fold_name() -> None:
    assert fold_name("layers.3.mlp.weight") == "layers.#.mlp.weight"
    assert fold_name("0.weight") == "#.weight"
    assert fold_name("blocks.10.attn.2.proj") == "blocks.#.attn.#.proj"
    assert fold_name("layer3.weight") == "layer3.weight"  # digits inside a name are not an index
    assert fold_name("h.12") == "h.#"


def test_human_bytes() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 * 2**30) == "3.0 GiB"


def test_rows_and_totals(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "m.safetensors"
    ws.save(mlp, path)
    listing = list_checkpoint(ws.open(path))
    assert isinstance(listing, Listing)
    assert [r.key for r in listing.rows] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert listing.rows[0].shape == (8, 4) and listing.rows[0].numel == 32 and listing.rows[0].nbytes == 128
    assert (listing.tensors, listing.parameters, listing.nbytes) == (4, 49, 196)
    assert listing.by_dtype == {"float32": {"tensors": 4, "elements": 49, "nbytes": 196}}
    assert listing.format == "safetensors" and listing.path == str(path)


def test_ties_are_counted_once(tmp_path: Path, tied_mlp: nn.Module) -> None:
    path = tmp_path / "tied.pt"
    torch.save(tied_mlp.state_dict(), path)
    listing = list_checkpoint(ws.open(path))
    assert listing.tensors == 8
    assert listing.parameters == 121 and listing.nbytes == 121 * 4
    rows = {r.key: r for r in listing.rows}
    assert rows["1.weight"].tied_with == ("3.weight",)
    assert rows["3.weight"].tied_with == ("1.weight",)
    assert rows["0.weight"].tied_with == ()
    assert "3.weight" in str(listing)


def test_fold(layered: Path) -> None:
    listing = list_checkpoint(ws.open(layered), fold=True)
    rows = {r.key: r for r in listing.rows}
    assert list(rows) == ["layers.#.mlp.weight", "layers.#.mlp.bias", "layers.#.extra", "head.weight"]
    assert rows["layers.#.mlp.weight"].count == 3
    assert rows["layers.#.mlp.weight"].numel == 72 and rows["layers.#.mlp.weight"].shape == (6, 4)
    assert rows["layers.#.extra"].count == 1 and rows["layers.#.extra"].dtype == "float16"
    assert rows["head.weight"].count == 1
    assert listing.parameters == 72 + 18 + 2 + 60  # folding changes rows, not totals
    assert "×3" in str(listing)


def test_fold_with_mixed_shapes_and_dtypes(tmp_path: Path) -> None:
    sd = {"h.0.w": torch.ones(2), "h.1.w": torch.ones(3, dtype=torch.float16)}
    path = tmp_path / "mixed.safetensors"
    ws.save(sd, path)
    (row,) = list_checkpoint(ws.open(path), fold=True).rows
    assert (row.key, row.shape, row.dtype, row.count, row.numel) == ("h.#.w", None, "mixed", 2, 5)
    assert "various" in str(list_checkpoint(ws.open(path), fold=True))


def test_select_and_sort(layered: Path) -> None:
    ckpt = ws.open(layered)
    picked = list_checkpoint(ckpt, select="layers.1")
    assert [r.key for r in picked.rows] == ["layers.1.mlp.weight", "layers.1.mlp.bias"]
    assert picked.parameters == 30  # totals follow the filter
    assert [r.key for r in list_checkpoint(ckpt, select="re:bias$").rows] == [
        f"layers.{i}.mlp.bias" for i in range(3)]
    by_size = [r.nbytes for r in list_checkpoint(ckpt, sort="size").rows]
    assert by_size == sorted(by_size, reverse=True) and by_size[0] == 240
    by_name = [r.key for r in list_checkpoint(ckpt, sort="name").rows]
    assert by_name == sorted(by_name)
    with pytest.raises(SelectorError, match="matched nothing"):
        list_checkpoint(ckpt, select="decoder.*")


def test_json(layered: Path) -> None:
    data = json.loads(list_checkpoint(ws.open(layered), fold=True).to_json())
    assert data["schema"] == "weightsmith.inspect/1"
    assert data["tensors"] == 8 and data["parameters"] == 152
    assert data["nbytes"] == 150 * 4 + 2 * 2
    assert data["folded"] is True
    assert data["rows"][0] == {"key": "layers.#.mlp.weight", "shape": [6, 4], "dtype": "float32",
                               "numel": 72, "nbytes": 288, "tied_with": [], "count": 3}


def test_nested_torch_file_lists_roots_and_objects(tmp_path: Path, mlp: nn.Module) -> None:
    import argparse

    path = tmp_path / "run.ckpt"
    torch.save({"model": mlp.state_dict(), "model_ema": mlp.state_dict(),
                "args": argparse.Namespace(lr=0.1)}, path)
    listing = list_checkpoint(ws.open(path))
    assert listing.root == "model"
    assert set(listing.roots) == {"model", "model_ema"}
    assert listing.other_objects == {"args": "argparse.Namespace"}
    text = str(listing)
    assert "root: 'model'" in text and "'model_ema'" in text
    assert "argparse.Namespace" in text


def test_dtype_subtotals_add_up_with_ties_and_say_elements(tmp_path):
    import weightsmith as ws
    from weightsmith.listing import list_checkpoint

    emb = torch.zeros(10, 4, dtype=torch.bfloat16)
    path = tmp_path / "tied.pt"
    torch.save({"emb.weight": emb, "head.weight": emb, "head.bias": torch.zeros(10),
                "position_ids": torch.arange(8)}, path)
    listing = list_checkpoint(ws.open(path))
    assert (listing.tensors, listing.elements) == (4, 40 + 10 + 8)
    assert sum(v["tensors"] for v in listing.by_dtype.values()) == listing.tensors
    assert sum(v["elements"] for v in listing.by_dtype.values()) == listing.elements
    assert sum(v["nbytes"] for v in listing.by_dtype.values()) == listing.nbytes
    assert listing.by_dtype["bfloat16"] == {"tensors": 2, "elements": 40, "nbytes": 80}
    text = listing.plain()
    assert "4 tensors, 58 elements (tied counted once), 184 B" in text
    assert "  bfloat16: 2 tensors, 40 elements, 80 B" in text and "parameters" not in text
    assert listing.to_dict()["parameters"] == 58  # kept for readers of earlier output


def test_elide_keeps_indices_and_the_last_segments():
    from weightsmith.listing import elide

    name = "model.encoder.layers.11.self_attention.output_projection.weight"
    assert elide(name, 80) == name
    short = elide(name, 40)
    assert len(short) <= 40 and ".11." in short and short.endswith("output_projection.weight")
    assert elide("a_very_long_single_segment_name_without_dots", 20) == "a_very_…without_dots"
