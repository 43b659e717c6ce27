"""Out: transformers ``from_pretrained`` loads every model folder weightsmith writes, 5.x and 4.x.

Each weightsmith writer puts the weights of a small ``BertForMaskedLM`` (a tied decoder included)
beside its ``config.json``; transformers 5.x (this environment) and the last 4.x release (the
separate environment `make tf4` builds, run in a subprocess) load the folder and must hold exactly
the saved values. transformers 4.x refuses safetensors files without ``"format": "pt"``.
DCP folders are not among them: transformers does not read DCP.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from _conformance import record
from _out_corpus import run_tf4
from safetensors.torch import save_file

import weightsmith as ws

_SCRIPT = Path(__file__).with_name("_tf4_load.py")
_ARCH = "BertForMaskedLM"


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, vocab_size=99, max_position_embeddings=16)
    model = transformers.BertForMaskedLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5).add_(0.25)  # nothing a fresh initialization could reproduce
    return model


def _source(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    path = folder.parent / "source.safetensors"
    if not path.exists():  # written by safetensors: the tied decoder stored under both keys
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path


_Write = Callable[[Path, dict[str, torch.Tensor]], object]
WRITERS: dict[str, _Write] = {
    "weightsmith.save -> safetensors": lambda f, s: ws.save(s, f / "model.safetensors"),
    "weightsmith.save -> sharded": lambda f, s: ws.save(s, f, max_shard_size="40KB"),
    "weightsmith.save -> torch (pytorch_model.bin)": lambda f, s: ws.save(s, f / "pytorch_model.bin"),
    "weightsmith.convert -> safetensors": lambda f, s: ws.convert(_source(f, s), f / "model.safetensors"),
    "weightsmith.convert -> sharded": lambda f, s: ws.convert(_source(f, s), f, max_shard_size="40KB"),
    "weightsmith.convert -> torch (pytorch_model.bin)": lambda f, s: ws.convert(_source(f, s), f / "pytorch_model.bin"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Writer name -> (model folder, reference safetensors file written by safetensors)."""
    model = _model()
    state = model.state_dict()
    root = tmp_path_factory.mktemp("tf_out")
    reference = root / "reference.safetensors"
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(reference))
    out: dict[str, tuple[Path, Path]] = {}
    for i, (name, write) in enumerate(WRITERS.items()):
        folder = root / f"w{i}" / "model"
        folder.mkdir(parents=True)
        model.config.save_pretrained(folder)
        write(folder, state)
        out[name] = (folder, reference)
    return out


def _differences(model: torch.nn.Module, reference: Path) -> list[str]:
    from safetensors.torch import load_file

    loaded = model.state_dict()
    return [k for k, v in load_file(reference).items() if k not in loaded or not torch.equal(loaded[k], v)]


@pytest.mark.parametrize("writer", list(WRITERS))
def test_transformers_5_loads_it(folders: dict[str, tuple[Path, Path]], writer: str) -> None:
    folder, reference = folders[writer]
    model = getattr(transformers, _ARCH).from_pretrained(folder)
    assert _differences(model, reference) == []
    record(direction="out", writer=writer, reader=f"transformers {_ARCH}.from_pretrained",
           check="every key loaded with the saved values, tied decoder included",
           versions=f"transformers {transformers.__version__}")


@pytest.fixture(scope="module")
def tf4_results(folders: dict[str, tuple[Path, Path]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    jobs = tmp_path_factory.mktemp("tf4") / "jobs.json"
    jobs.write_text(json.dumps([{"name": n, "folder": str(f), "reference": str(r), "architecture": _ARCH}
                                for n, (f, r) in folders.items()]))
    done = run_tf4(_SCRIPT, str(jobs))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["version"].startswith("4."), result["version"]
    return result


@pytest.mark.parametrize("writer", list(WRITERS))
def test_transformers_4_loads_it(tf4_results: dict[str, object], writer: str) -> None:
    results = tf4_results["results"]
    assert isinstance(results, dict)
    assert results[writer] == "ok"
    record(direction="out", writer=writer, reader=f"transformers {_ARCH}.from_pretrained (separate environment)",
           check="every key loaded with the saved values, tied decoder included",
           versions=f"transformers {tf4_results['version']}")
