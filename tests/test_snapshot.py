from collections.abc import Mapping

import pytest
import torch
from torch import nn

from weightsmith import AssignError, ModelError
# the submodule shares the name of its main function; import from it directly
from weightsmith.snapshots import Snapshot, restore_, snapshot


from _models import make_mlp, make_tied


def train(model: nn.Module, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.ones(2, 4)).square().sum().backward()
        opt.step()


def test_snapshot_survives_training_and_restore_is_bit_exact():
    model = make_mlp()
    params = {name: p for name, p in model.named_parameters()}
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    aliasing = model.state_dict()  # the trap: these tensors are the live ones

    snap = snapshot(model)
    train(model)

    assert not torch.equal(aliasing["0.weight"], expected["0.weight"])
    assert all(torch.equal(snap[k], expected[k]) for k in expected)
    assert not torch.equal(model[0].weight, snap["0.weight"])

    report = restore_(model, snap)
    assert report.written == tuple(expected)
    for name, p in model.named_parameters():
        assert p is params[name]
        assert torch.equal(p, snap[name])
    train(model)  # an optimizer built before the restore still moves the model
    assert not torch.equal(model[0].weight, snap["0.weight"])


def test_snapshot_owns_its_memory():
    model = make_mlp()
    snap = snapshot(model)
    model_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not model_ptrs & {t.untyped_storage().data_ptr() for t in snap.values()}
    assert not any(t.requires_grad for t in snap.values())


def test_snapshot_is_a_state_dict_with_buffers():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model[1].register_buffer("scratch", torch.zeros(1), persistent=False)
    snap = snapshot(model)
    assert isinstance(snap, Mapping)
    assert list(snap) == list(model.state_dict())
    assert "1.running_mean" in snap and "1.scratch" not in snap
    other = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    other.load_state_dict(snap)
    assert torch.equal(other[0].weight, model[0].weight)
    assert list(snapshot(model, buffers=False)) == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_tied_tensors_are_stored_once():
    model = make_tied()
    snap = snapshot(model)
    assert snap["1.weight"] is snap["3.weight"]
    unique = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() dedups
    assert snap.nbytes == unique
    assert "Snapshot(" in repr(snap)
    with torch.no_grad():
        model[1].weight.zero_()
    restore_(model, snap)
    assert model[1].weight is model[3].weight
    assert torch.equal(model[3].weight, snap["3.weight"])


def test_device_none_keeps_each_tensor_where_it_is():
    model = make_mlp()
    snap = snapshot(model, device=None)
    assert all(t.device == torch.device("cpu") for t in snap.values())
    assert isinstance(snap, Snapshot)


def test_restore_checks_everything_first():
    model = make_mlp()
    snap = dict(snapshot(model))
    with torch.no_grad():
        model[2].bias.fill_(7.0)
    live = {k: v.clone() for k, v in model.state_dict().items()}

    bad = dict(snap)
    bad["0.weight"] = torch.zeros(4, 8)
    del bad["0.bias"]
    with pytest.raises(AssignError) as info:
        restore_(model, bad)
    assert "'0.weight': expected shape (8, 4), got (4, 8)" in info.value.problems
    assert "'0.bias': missing from the snapshot" in info.value.problems
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())

    del bad["0.weight"]
    bad["extra.weight"] = torch.zeros(1)
    report = restore_(model, bad, strict=False)
    assert ("extra.weight", "not in the model") in report.skipped
    assert ("0.bias", "not in the snapshot") in report.skipped
    assert model[2].bias.item() == snap["2.bias"].item()


def test_restore_from_a_file(tmp_path):
    model = make_tied()
    path = tmp_path / "snap.pt"
    snap = snapshot(model)
    torch.save(dict(snap), path)
    loaded = torch.load(path, weights_only=True)
    assert type(loaded) is dict and loaded["1.weight"] is loaded["3.weight"]
    train(nn.Sequential(*list(model)[:2]))
    restore_(model, loaded)
    assert all(torch.equal(model.state_dict()[k], snap[k]) for k in snap)


def test_meta_models_cannot_be_snapshotted():
    with torch.device("meta"):
        model = nn.Linear(2, 2)
    with pytest.raises(ModelError, match="meta device"):
        snapshot(model)
