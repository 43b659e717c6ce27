"""In: timm-style training checkpoints written with ``torch.save``.

timm's ``CheckpointSaver`` saves ``{"epoch", "arch", "state_dict", "optimizer", "args",
"version", "metric", "state_dict_ema"}``, with ``args`` an ``argparse.Namespace``: such files
need ``weights_only=False`` (or ``safe_globals``) in ``torch.load``. weightsmith lists
``args`` by class name without constructing it, reads ``state_dict`` by default and
``state_dict_ema`` as a root.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from _in_checks import Case, Corpus, Spec, params, randomize_, run, versions
from torch import nn

import weightsmith as ws

WRITER = "torch.save, timm CheckpointSaver layout"


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _build(root: str):
    def build(folder: Path) -> Case:
        torch.manual_seed(0)
        model, ema = randomize_(_model(), seed=1), randomize_(_model(), seed=2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        optimizer.step()  # momentum buffers: tensors outside the weights
        path = folder / "checkpoint-3.pth.tar"
        torch.save({"epoch": 3, "arch": "tiny_cnn", "state_dict": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "args": argparse.Namespace(lr=0.1, model="tiny_cnn"),
                    "version": 2, "metric": 71.5, "state_dict_ema": ema.state_dict()}, path)
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(path, weights_only=True)
        return Case(path, loaded[root], model=_model, root=None if root == "state_dict" else root)
    return build


SPECS = [Spec("state_dict", WRITER, versions("torch"), _build("state_dict"), has_model=True),
         Spec("state_dict_ema", WRITER, versions("torch"), _build("state_dict_ema"), has_model=True)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("in_timm"))


@pytest.mark.parametrize(("spec", "check"), params(SPECS))
def test_timm_checkpoint(corpus: Corpus, spec: Spec, check: str, tmp_path: Path) -> None:
    run(spec, corpus.case(spec), check, tmp_path)


def test_timm_args_namespace_is_listed_never_constructed(corpus: Corpus) -> None:
    with ws.open(corpus.case(SPECS[0]).path) as ckpt:
        assert ckpt.root == "state_dict"
        assert "state_dict_ema" in ckpt.roots
        assert ckpt.other_objects.get("args") == "argparse.Namespace"
