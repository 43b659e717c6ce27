"""Out: every weightsmith writer's files, read by the ecosystem's own loaders, bit for bit.

safetensors files and shards by ``safetensors.torch.load_file``, torch files by
``torch.load(weights_only=True)``, DCP folders by ``torch.distributed.checkpoint.load``; every
dtype of the corpus, the 0-d, empty and non-contiguous tensors, and ties.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors
import torch
from _conformance import record
from _out_corpus import TIED, WRITERS, same, state
from safetensors import safe_open
from safetensors.torch import load_file

_VERSIONS = f"safetensors {safetensors.__version__}, torch {torch.__version__.split('+')[0]}"


def _expected(writer: str) -> dict[str, torch.Tensor]:
    return state(float4=writer.startswith("weightsmith.save"))


def _check_safetensors(loaded: dict[str, torch.Tensor], ties: dict[str, str], want: dict[str, torch.Tensor]) -> None:
    """Every key present with its bits, or a tie recorded to a stored key holding them."""
    assert set(loaded) | set(ties) == set(want)
    for key, value in want.items():
        got = loaded[ties.get(key, key)]
        assert same(got, value), key


def _read_safetensors(paths: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    loaded: dict[str, torch.Tensor] = {}
    ties: dict[str, str] = {}
    for path in paths:
        loaded.update(load_file(path))
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        assert meta["format"] == "pt", path  # transformers 4.x needs it
        ties.update(json.loads(meta.get("weightsmith.ties", "{}")))
    return loaded, ties


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("writer", list(WRITERS))
def test_weightsmith_output_reads_bit_identical_in_the_formats_own_loader(tmp_path: Path, writer: str) -> None:
    write, fmt = WRITERS[writer]
    want = _expected(writer)
    out = write(tmp_path, want)
    if fmt == "safetensors":
        reader = "safetensors.torch.load_file"
        _check_safetensors(*_read_safetensors([out]), want)
    elif fmt == "sharded":
        reader = "safetensors.torch.load_file (every shard of the index)"
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and index["metadata"]["total_size"] > 0
        loaded, ties = _read_safetensors([out / s for s in shards])
        assert {k: index["weight_map"][k] for k in loaded} == index["weight_map"]
        _check_safetensors(loaded, ties, want)
    elif fmt == "torch":
        reader = "torch.load(weights_only=True)"
        loaded = torch.load(out, weights_only=True)
        assert set(loaded) == set(want)
        for key, value in want.items():
            assert same(loaded[key], value), key
        if writer.startswith("weightsmith.save"):  # a tie in the saved state stays one storage
            assert loaded[TIED[0]].data_ptr() == loaded[TIED[1]].data_ptr()
    else:
        import torch.distributed.checkpoint as dcp

        reader = "torch.distributed.checkpoint.load"
        target = {k: torch.empty_like(v.contiguous()) for k, v in want.items()}
        dcp.load(target, checkpoint_id=out, no_dist=True)
        for key, value in want.items():
            assert same(target[key], value), key
    record(direction="out", writer=writer, reader=reader,
           check=f"{len(want)} keys, every dtype, 0-d/empty/non-contiguous/tied: bit-identical", versions=_VERSIONS)
