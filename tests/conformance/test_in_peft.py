"""In: a peft LoRA adapter folder written by ``get_peft_model(...).save_pretrained``.

The folder holds ``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight``,
without the adapter's name) and ``adapter_config.json``. Expected values come from peft's own
``load_peft_weights``. Loading into the peft model names the adapter (``lora_A.default.weight``),
which a rename rule does, leaving the base weights as they are.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _in_checks import Case, Corpus, Spec, params, randomize_, run, versions
from torch import nn

peft = pytest.importorskip("peft")


def _peft_model() -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
    return peft.get_peft_model(base, config)


def _build(folder: Path) -> Case:
    model = _peft_model()
    randomize_(model, seed=1)
    path = folder / "adapter"
    model.save_pretrained(path)
    from peft.utils import load_peft_weights

    return Case(path, load_peft_weights(str(path), device="cpu"), model=_peft_model,
                load_options={"rename": [("re:^(.*)\\.(lora_[AB])\\.weight$", "\\1.\\2.default.weight")],
                              "strict": False, "min_coverage": 0.0},
                model_key=lambda k: k.replace(".weight", ".default.weight"))


SPECS = [Spec("lora-adapter", "peft save_pretrained", versions("torch", "peft"), _build, has_model=True)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("in_peft"))


@pytest.mark.parametrize(("spec", "check"), params(SPECS))
def test_peft_adapter(corpus: Corpus, spec: Spec, check: str, tmp_path: Path) -> None:
    run(spec, corpus.case(spec), check, tmp_path)


def test_adapter_keys_are_peft_s_own(corpus: Corpus) -> None:
    case = corpus.case(SPECS[0])
    assert (case.path / "adapter_config.json").is_file()
    assert sorted(case.expected) == [f"base_model.model.{m}.lora_{ab}.weight" for m in (0, 2) for ab in "AB"]
