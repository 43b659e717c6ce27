"""`check`: named findings for NaN, Inf, dead and exploding tensors (S5)."""

import json

import pytest
import torch
from torch import nn

import weightsmith
from weightsmith.health import CHECKS, HealthReport, check
from weightsmith.tensor_stats import stats


def found(report):
    return [(f.key, f.kind, f.value) for f in report.findings]


def test_random_model_is_healthy(mlp):
    report = check(mlp)
    assert report.ok and report.findings == [] and report.checked == 4
    assert str(report) == "healthy: 4 tensors checked"


def test_each_problem_is_named_with_key_kind_and_value():
    torch.manual_seed(0)
    sd = {
        "good": torch.randn(100),
        "nan": torch.randn(100),
        "inf": torch.randn(100),
        "zero": torch.zeros(7),
        "const": torch.full((4,), 0.5),
        "big": torch.randn(10),
    }
    sd["nan"][[1, 2]] = float("nan")
    sd["inf"][5] = -float("inf")
    sd["big"][3] = 2e4
    report = check(sd)
    assert not report.ok
    assert found(report) == [("nan", "nan", 2), ("inf", "inf", 1), ("zero", "all_zero", 0.0),
                             ("const", "constant", 0.5), ("big", "exploding", 2e4)]
    assert report.findings[0].message == "2 of 100 values are NaN"
    text = str(report)
    assert "unhealthy: 3 errors, 2 warnings in 5 of 6 tensors checked" in text and "exploding" in text
    assert [f.kind for f in report.errors] == ["nan", "inf", "exploding"]
    assert [f.kind for f in report.warnings] == ["all_zero", "constant"]


def test_zero_and_constant_tensors_are_warnings_unless_asked():
    sd = {"bias": torch.zeros(4), "norm": torch.ones(4), "w": torch.randn(4, 4)}
    report = check(sd)
    assert report.ok and [(f.key, f.severity) for f in report.findings] == [
        ("bias", "warning"), ("norm", "warning")]
    assert str(report).lstrip().startswith("health of")
    assert str(report).endswith("healthy: 0 errors, 2 warnings in 2 of 3 tensors checked")
    strict = check(sd, errors=("nan", "inf", "all_zero"))
    assert not strict.ok and [f.key for f in strict.errors] == ["bias"]
    with pytest.raises(weightsmith.errors.UsageError, match="unknown errors"):
        check(sd, errors=("zeros",))


def test_max_abs_threshold_is_configurable():
    sd = {"w": torch.tensor([50.0, -200.0])}
    assert check(sd).ok
    report = check(sd, max_abs=100)
    assert found(report) == [("w", "exploding", 200.0)]
    assert report.max_abs == 100.0


def test_fresh_model_needs_the_dead_checks_left_out():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    nn.init.zeros_(model[0].bias)
    assert {f.kind for f in check(model).findings} == {"all_zero", "constant"}
    assert check(model, checks=("nan", "inf", "exploding")).ok


def test_integer_buffers_are_not_judged():
    model = nn.BatchNorm1d(3)  # num_batches_tracked is an all-zero int64 counter
    kinds = {(f.key, f.kind) for f in check(model).findings}
    assert kinds == {("running_mean", "all_zero"), ("weight", "constant"), ("bias", "all_zero"),
                     ("running_var", "constant")}


def test_nan_in_a_buffer_is_found():
    model = nn.BatchNorm1d(3)
    model.running_var[1] = float("nan")
    report = check(model, select="running_*")
    assert found(report) == [("running_mean", "all_zero", 0.0), ("running_var", "nan", 1)]


def test_an_existing_stats_report_is_judged_without_rereading():
    r = stats({"w": torch.tensor([1.0, float("inf")])})
    report = check(r)
    assert found(report) == [("w", "inf", 1)]


def test_bad_options_are_listed_together():
    r = stats({"w": torch.ones(2)})
    with pytest.raises(ValueError) as e:
        check(r, select="w", max_abs=-1, checks=("nan", "dead"))
    assert "unknown checks ['dead']" in str(e.value)
    assert "max_abs" in str(e.value) and "select=" in str(e.value)


def test_report_serializes_with_schema_and_verdict():
    report = check({"w": torch.tensor([float("nan"), 1.0])})
    data = json.loads(report.to_json())
    assert data["schema"] == HealthReport.SCHEMA == "weightsmith.health/1"
    assert data["ok"] is False
    assert data["findings"] == [{"key": "w", "kind": "nan", "value": 1,
                                 "message": "1 of 2 values are NaN", "severity": "error"}]
    assert (data["errors"], data["warnings"]) == (1, 0)
    assert set(CHECKS) == {"nan", "inf", "all_zero", "constant", "exploding"}


def test_public_names_resolve():
    assert weightsmith.check is check
    assert weightsmith.HealthReport is HealthReport


def test_a_model_with_no_data_is_not_called_healthy():
    with torch.device("meta"):
        model = nn.Linear(4, 2)
    report = check(model)
    assert report.checked == 0 and set(report.skipped) == {"weight", "bias"}
    assert str(report).startswith("nothing checked: every tensor was skipped")
    assert "healthy" not in str(report)
