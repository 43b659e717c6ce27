"""In: Hugging Face model folders written by transformers' ``save_pretrained``.

A tiny BERT, saved as one file and sharded with a small ``max_shard_size``, and a masked-LM
head whose decoder weight is tied to the word embeddings (``save_pretrained`` stores it once).
Expected values come from ``from_pretrained``, the writer's own loader. transformers 5.x writes
safetensors only: ``safe_serialization=False`` no longer gives a ``pytorch_model.bin``, so the
``.bin`` layout is covered by the torch.save corpus instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _in_checks import Case, Corpus, Spec, params, randomize_, run, versions

import weightsmith as ws

transformers = pytest.importorskip("transformers")

VERSIONS = versions("torch", "transformers")
WRITER = "transformers save_pretrained"


def _config() -> transformers.BertConfig:
    return transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=32)


def _build(cls_name: str, **save: object):
    def build(folder: Path) -> Case:
        cls = getattr(transformers, cls_name)
        torch.manual_seed(0)
        model = randomize_(cls(_config()))
        model.tie_weights()  # randomize_ filled the tied pair once through the shared Parameter
        path = folder / "model"
        model.save_pretrained(path, **save)
        reloaded = cls.from_pretrained(path).state_dict()
        with ws.open(path) as ckpt:  # the keys the folder stores
            stored = set(ckpt)
        return Case(path, {k: v for k, v in reloaded.items() if k in stored}, model=lambda: cls(_config()))
    return build


SPECS = [
    Spec("bert-single", WRITER, VERSIONS, _build("BertModel"), has_model=True),
    Spec("bert-sharded", f"{WRITER} (max_shard_size)", VERSIONS, _build("BertModel", max_shard_size="20KB"),
         has_model=True),
    Spec("bert-mlm-tied", WRITER, VERSIONS, _build("BertForMaskedLM"), has_model=True),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("in_transformers"))


@pytest.mark.parametrize(("spec", "check"), params(SPECS))
def test_transformers_folder(corpus: Corpus, spec: Spec, check: str, tmp_path: Path) -> None:
    run(spec, corpus.case(spec), check, tmp_path)


def test_sharded_folder_really_has_several_shards(corpus: Corpus) -> None:
    case = corpus.case(SPECS[1])
    assert len(list(case.path.glob("model-*-of-*.safetensors"))) > 1
    assert (case.path / "model.safetensors.index.json").is_file()
