import json

import pytest
import torch
from torch import nn

from weightsmith import AssignError, SelectorError, assign_, update_


from _models import make_mlp, make_tied


def frozen_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    ids = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    return state, ids


def assert_unchanged(model: nn.Module, before: tuple[dict[str, torch.Tensor], dict[str, int]]) -> None:
    state, ids = before
    now = model.state_dict(keep_vars=True)
    assert list(now) == list(state)
    for k, v in now.items():
        assert torch.equal(v, state[k]), k
        assert id(v) == ids[k], k


def test_assign_writes_in_place_and_the_optimizer_still_moves_the_model():
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    weight = model[0].weight
    new = torch.arange(32, dtype=torch.float64).reshape(8, 4)

    report = assign_(model, {"0.weight": new})

    assert report.written == ("0.weight",)
    assert model[0].weight is weight
    assert weight.dtype == torch.float32 and weight.requires_grad and weight.is_leaf
    assert weight.grad_fn is None
    assert torch.equal(weight, new.float())
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight, new.float())  # the optimizer's step reached the model


def test_integer_values_land_as_the_parameters_float_dtype():
    model = make_mlp()
    assign_(model, {"2.bias": torch.tensor([3])})
    assert model[2].bias.dtype == torch.float32
    assert model[2].bias.item() == 3.0


def test_every_problem_is_listed_and_the_model_is_bit_identical():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    before = frozen_state(model)
    bad = {
        "0.weight": torch.zeros(4, 8),                              # transposed
        "0.wieght": torch.zeros(8, 4),                              # typo
        "1.num_batches_tracked": torch.tensor(1.5),                 # float -> int
        "1.bias": torch.zeros(8, dtype=torch.complex64),            # complex -> real
        "1.weight": torch.full((8,), 2.0),                          # fine, but not written
    }
    with pytest.raises(AssignError) as info:
        assign_(model, bad)

    problems = info.value.problems
    assert len(problems) == 4
    assert "'0.weight': expected shape (8, 4), got (4, 8)" in problems
    assert any("'0.wieght'" in p and "did you mean '0.weight'" in p for p in problems)
    assert any("'1.num_batches_tracked'" in p and "float32" in p and "int64" in p for p in problems)
    assert any("'1.bias'" in p and "complex64" in p for p in problems)
    assert "nothing was written" in str(info.value)
    assert_unchanged(model, before)


def test_missing_names_are_fine_and_unknown_ones_skip_when_not_strict():
    model = make_mlp()
    report = assign_(model, {"2.bias": torch.zeros(1), "head.bias": torch.zeros(1)}, strict=False)
    assert report.written == ("2.bias",)
    assert report.skipped == (("head.bias", "not in the model"),)
    assert model[2].bias.item() == 0.0
    with pytest.raises(AssignError):
        assign_(model, {"head.bias": torch.zeros(1)})


def test_buffers_can_be_assigned():
    model = nn.Sequential(nn.BatchNorm1d(3))
    assign_(model, {"0.running_mean": torch.tensor([1.0, 2.0, 3.0])})
    assert torch.equal(model[0].running_mean, torch.tensor([1.0, 2.0, 3.0]))


def test_assigning_one_tied_name_writes_the_shared_tensor():
    model = make_tied()
    report = assign_(model, {"1.weight": torch.eye(8)})
    assert model[1].weight is model[3].weight
    assert torch.equal(model[3].weight, torch.eye(8))
    assert report.through_ties == ("3.weight",)


def test_two_different_values_for_one_tied_tensor_are_an_error():
    model = make_tied()
    before = frozen_state(model)
    with pytest.raises(AssignError, match="tied"):
        assign_(model, {"1.weight": torch.eye(8), "3.weight": torch.zeros(8, 8)})
    assert_unchanged(model, before)
    # the same values under both names (a state dict of a tied model) are fine
    report = assign_(model, {"1.weight": torch.eye(8), "3.weight": torch.eye(8)})
    assert report.written == ("1.weight", "3.weight")


def test_a_tied_models_own_state_dict_assigns_back_even_with_nan():
    model = make_tied()
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    before = frozen_state(model)
    report = assign_(model, model.state_dict())
    assert "3.weight" in report.written
    assert torch.isnan(model[3].weight[0, 0])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[0][k], rtol=0, atol=0, equal_nan=True)


class Exploding(torch.Tensor):
    """A tensor whose values cannot be copied out: a write failing midway."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_:
            raise RuntimeError("device lost")
        return super().__torch_function__(func, types, args, kwargs or {})


class Wrapped(torch.Tensor):
    """A tensor subclass that copies fine: a write that could fail, and does not."""


def test_a_write_failing_midway_restores_what_was_already_written():
    model = make_mlp()
    before = frozen_state(model)
    seen = []

    class Probing(Exploding):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.Tensor.copy_:
                seen.append(model[0].bias.detach().clone())  # what the model held when this write came
            return super().__torch_function__(func, types, args, kwargs)

    mapping = {"0.weight": torch.zeros(8, 4), "0.bias": torch.ones(8).as_subclass(Wrapped),
               "2.bias": torch.ones(1).as_subclass(Probing)}
    with pytest.raises(AssignError, match="device lost") as info:
        assign_(model, mapping)
    assert torch.equal(seen[0], torch.ones(8))  # 0.bias had been written ...
    assert isinstance(info.value.__cause__, RuntimeError)
    assert_unchanged(model, before)  # ... and was put back


def test_swapping_two_weights_reads_the_old_values():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    a, b = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    assign_(model, {"0.weight": model[1].weight, "1.weight": model[0].weight})
    assert torch.equal(model[0].weight, b)
    assert torch.equal(model[1].weight, a)


def test_meta_tensors_are_refused():
    with torch.device("meta"):
        model = nn.Linear(2, 2)
    with pytest.raises(AssignError, match="meta device"):
        assign_(model, {"weight": torch.zeros(2, 2)})
    with pytest.raises(AssignError, match="meta device"):
        assign_(nn.Linear(2, 2), {"weight": torch.zeros(2, 2, device="meta")})


def test_report_has_a_schema_and_a_table():
    report = assign_(make_tied(), {"1.bias": torch.zeros(8)})
    data = json.loads(report.to_json())
    assert data["schema"] == "weightsmith.assign/1"
    assert data["through_ties"] == ["3.bias"]
    assert "1.bias" in str(report) and "written (tied)" in str(report)


# update_ ----------------------------------------------------------------------------------


def test_update_adds_one_and_sets_to_zero_in_place():
    model = make_mlp()
    params = list(model.parameters())
    old = [p.detach().clone() for p in params]

    def add_one(t: torch.Tensor) -> None:
        t.add_(1)  # changing the argument in place and returning None is enough

    update_(model, add_one)
    assert all(torch.equal(p, o + 1) for p, o in zip(model.parameters(), old))
    update_(model, lambda t: torch.zeros_like(t))
    assert all(p.abs().sum() == 0 for p in model.parameters())
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]


def test_update_scales_every_weight_with_more_than_one_dimension():
    model = make_mlp()
    old = {k: v.clone() for k, v in model.state_dict().items()}
    report = update_(model, lambda t: t * 0.5, select=lambda name, p: p.ndim > 1)
    assert report.written == ("0.weight", "2.weight")
    assert torch.equal(model[0].weight, old["0.weight"] * 0.5)
    assert torch.equal(model[2].weight, old["2.weight"] * 0.5)
    assert torch.equal(model[0].bias, old["0.bias"])


def test_update_changes_a_tied_tensor_once():
    model = make_tied()
    old = model[1].weight.detach().clone()
    report = update_(model, lambda t: t + 1, select="*.weight")
    assert torch.equal(model[3].weight, old + 1)
    assert "3.weight" in report.through_ties


def test_update_writes_nothing_when_fn_fails_on_a_later_tensor():
    model = make_mlp()
    before = frozen_state(model)
    calls = []

    def flaky(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape)
        if len(calls) == 3:
            raise ValueError("bad batch")
        return t + 1

    with pytest.raises(AssignError, match="bad batch"):
        update_(model, flaky)
    assert_unchanged(model, before)


def test_update_rejects_results_that_do_not_fit():
    model = make_mlp()
    before = frozen_state(model)
    with pytest.raises(AssignError) as info:
        update_(model, lambda t: t.flatten())
    assert len(info.value.problems) == 2  # the two weights; biases are already flat
    with pytest.raises(AssignError, match="returned a float"):
        update_(model, lambda t: 0.0)
    assert_unchanged(model, before)


def test_update_select_matching_nothing_is_an_error():
    with pytest.raises(SelectorError):
        update_(make_mlp(), lambda t: t, select="encoder.*")


def test_update_reaches_buffers_only_when_asked():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    update_(model, lambda t: t + 1, select="1.*", buffers=True)
    assert torch.equal(model[1].running_var, torch.full((2,), 2.0))
    assert model[1].num_batches_tracked.item() == 1
    update_(model, lambda t: t + 1, select="1.*")
    assert torch.equal(model[1].running_var, torch.full((2,), 2.0))
