"""In: a Lightning ``.ckpt`` written by ``Trainer.save_checkpoint`` after one real training step.

The checkpoint nests the model under ``state_dict`` beside optimizer states, loop state,
callbacks and ``hyper_parameters``; weightsmith reads ``state_dict`` by default. Expected
values come from ``LightningModule.load_from_checkpoint``, Lightning's own loader.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
from _in_checks import Case, Corpus, Spec, params, run, versions
from torch import nn

L = pytest.importorskip("lightning")


class TinyModule(L.LightningModule):
    """The smallest LightningModule that trains: two linear layers, Adam."""

    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _build(folder: Path) -> Case:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randn(8, 1))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "few dataloader workers" and the like
        logging.getLogger("lightning").setLevel(logging.ERROR)
        trainer.fit(TinyModule(), torch.utils.data.DataLoader(data, batch_size=4))
    path = folder / "tiny.ckpt"
    trainer.save_checkpoint(path)
    loaded = TinyModule.load_from_checkpoint(path, map_location="cpu", weights_only=False)
    return Case(path, dict(loaded.state_dict()), model=TinyModule)


SPECS = [Spec("trainer-ckpt", "lightning Trainer.save_checkpoint", versions("torch", "lightning"), _build,
              has_model=True)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("in_lightning"))


@pytest.mark.parametrize(("spec", "check"), params(SPECS))
def test_lightning_checkpoint(corpus: Corpus, spec: Spec, check: str, tmp_path: Path) -> None:
    run(spec, corpus.case(spec), check, tmp_path)


def test_lightning_checkpoint_holds_training_state_beside_the_weights(corpus: Corpus) -> None:
    import weightsmith as ws

    with ws.open(corpus.case(SPECS[0]).path) as ckpt:
        assert ckpt.root == "state_dict"
        assert any(r.startswith("optimizer_states") for r in ckpt.roots)
