import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import weightsmith as ws
from weightsmith.errors import ModelError, SelectorError
from weightsmith.freeze import (
    FreezeReport,
    freeze_,
    freeze_state,
    frozen,
    load_freeze_state_,
    trainable,
    unfreeze_,
)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.block = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.block(self.backbone(x))))


def flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}


def test_freeze_all_then_again_reports_changed_and_already():
    model = mlp()
    report = freeze_(model)
    assert report.changed == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert report.unchanged == []
    assert not any(flags(model).values())
    assert (report.trainable_params, report.frozen_params) == (0, 4 * 8 + 8 + 8 + 1)
    again = freeze_(model)
    assert again.changed == [] and again.unchanged == list(flags(model))
    assert ws.freeze_ is freeze_


def test_s20_freeze_all_but_head_replace_head_and_train_only_that():
    torch.manual_seed(0)
    model = Net()
    report = freeze_(model, "!head")
    assert [n for n, f in flags(model).items() if f] == ["head.weight", "head.bias"]
    assert "head.weight" not in report.changed
    model.head = nn.Linear(8, 3)  # a new head trains by default
    assert [n for n, _ in trainable(model)] == ["head.weight", "head.bias"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for _, p in trainable(model)], lr=0.1)
    model(torch.randn(6, 4)).sum().backward()
    opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (not name.startswith("head")), name


def test_selector_matching_nothing_fails_and_changes_nothing():
    model = mlp()
    with pytest.raises(SelectorError, match="matched nothing"):
        freeze_(model, "haed")
    assert all(flags(model).values())


def test_freezing_a_tied_name_reports_its_alias_too():
    lin = nn.Linear(8, 8)
    model = nn.Sequential(nn.Linear(4, 8), lin, nn.ReLU(), lin)
    report = freeze_(model, "1.weight")
    assert report.changed == ["1.weight", "3.weight"]
    assert [n for n, _ in trainable(model)] == ["0.weight", "0.bias", "1.bias"]


def test_unfreeze_selected_only():
    model = mlp()
    freeze_(model)
    report = unfreeze_(model, "2.*")
    assert report.changed == ["2.weight", "2.bias"]
    assert flags(model) == {"0.weight": False, "0.bias": False, "2.weight": True, "2.bias": True}
    assert report.trainable_params == 9


def test_frozen_restores_exact_mixed_state_even_on_exception():
    model = mlp()
    model[0].bias.requires_grad_(False)
    start = flags(model)
    with frozen(model) as report:
        assert isinstance(report, FreezeReport)
        assert not any(flags(model).values())
    assert flags(model) == start
    with pytest.raises(RuntimeError, match="boom"):
        with frozen(model, "2"):
            assert flags(model)["2.weight"] is False
            raise RuntimeError("boom")
    assert flags(model) == start


def bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))


def run_in_train_mode(model: nn.Module) -> torch.Tensor:
    model.train()
    before = model[1].running_mean.clone()
    model(torch.randn(16, 4) * 3 + 1)
    return before


def test_norm_eval_keeps_frozen_batchnorm_statistics_still_across_train():
    model = bn_model()
    report = freeze_(model, "1", norm_eval=True)
    assert report.norm_eval == ["1"]
    before = run_in_train_mode(model)
    assert model.training and not model[1].training
    assert torch.equal(model[1].running_mean, before)

    released = unfreeze_(model, "1")
    assert released.norm_eval == ["1"]
    assert "train" not in vars(model[1])
    assert model[1].training  # follows the model again
    before = run_in_train_mode(model)
    assert not torch.equal(model[1].running_mean, before)


def test_without_norm_eval_frozen_batchnorm_statistics_keep_moving():
    model = bn_model()
    report = freeze_(model, "1")
    assert report.norm_eval == []
    before = run_in_train_mode(model)
    assert not torch.equal(model[1].running_mean, before)


def test_norm_eval_skips_norm_layers_that_still_train():
    model = bn_model()
    assert freeze_(model, "1.weight", norm_eval=True).norm_eval == []  # bias still trains
    assert freeze_(model, "1.bias", norm_eval=True).norm_eval == ["1"]


def test_held_model_survives_deepcopy_and_torch_save(tmp_path):
    model = bn_model()
    freeze_(model, norm_eval=True)
    clone = copy.deepcopy(model)
    clone.train()
    assert not clone[1].training
    assert clone[1].train.module is clone[1]  # bound to the copy, not to the original
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    loaded.train()
    assert not loaded[1].training and loaded[0].training


def test_frozen_with_norm_eval_restores_training_flags_and_train_method():
    model = bn_model().eval()
    with frozen(model, norm_eval=True):
        model.train()
        assert not model[1].training
    assert not model[1].training  # back to its flag from before the block
    assert "train" not in vars(model[1])
    model.train()
    assert model[1].training


def test_freeze_state_round_trips_through_safetensors_metadata(tmp_path):
    model = Net()
    freeze_(model, "backbone")
    state = freeze_state(model)
    path = tmp_path / "ckpt.safetensors"
    save_file(model.state_dict(), str(path), metadata={"weightsmith.freeze": json.dumps(state)})

    fresh = Net()
    with safe_open(str(path), "pt") as f:
        text = f.metadata()["weightsmith.freeze"]
    report = load_freeze_state_(fresh, text)
    assert report.action == "load"
    assert flags(fresh) == state
    assert report.changed == ["backbone.0.weight", "backbone.0.bias", "backbone.1.weight", "backbone.1.bias"]


def test_load_freeze_state_checks_everything_first():
    model = mlp()
    with pytest.raises(ModelError) as info:
        load_freeze_state_(model, {"0.weight": "no", "9.bias": False, "2.weight": False})
    message = str(info.value)
    assert "expected a bool" in message and "'9.bias'" in message and "missing names" in message
    assert all(flags(model).values())
    report = load_freeze_state_(model, {"0.weight": False}, strict=False)
    assert report.changed == ["0.weight"]
    with pytest.raises(ModelError, match="not valid JSON"):
        load_freeze_state_(model, "{oops")


def test_load_freeze_state_refuses_conflicting_flags_for_one_tied_parameter():
    lin = nn.Linear(2, 2)
    model = nn.Sequential(lin, lin)
    with pytest.raises(ModelError, match="one tied parameter"):
        load_freeze_state_(model, {"0.weight": False, "0.bias": True, "1.weight": True, "1.bias": True})
    assert all(flags(model).values())


def test_s21_freeze_block_at_epoch_5_unfreeze_and_reinit_at_epoch_10():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    history = {}
    for epoch in range(12):
        if epoch == 5:
            freeze_(model, "block")
        if epoch == 10:
            unfreeze_(model, "block")
            model.block.reset_parameters()
            history["reinit"] = model.block.weight.detach().clone()
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        history[epoch] = model.block.weight.detach().clone()
    assert not torch.equal(history[3], history[4])  # trains before
    assert all(torch.equal(history[4], history[e]) for e in range(5, 10))  # still while frozen
    assert not torch.equal(history["reinit"], history[9])  # re-initialized
    assert not torch.equal(history[11], history["reinit"])  # trains again


def test_trainable_counts_a_tied_parameter_once():
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    assert [n for n, _ in trainable(model)] == ["0.weight", "0.bias"]


def test_report_renders_and_serializes():
    report = freeze_(bn_model(), norm_eval=True)
    text = str(report)
    assert "0.weight" in text and "held in eval mode" in text and "trainable 0" in text
    data = report.to_dict()
    assert data["schema"] == "weightsmith.freeze/1" and data["norm_eval"] == ["1"]
