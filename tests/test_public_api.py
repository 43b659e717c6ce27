"""The curated public API: exactly these names, each resolves, errors share one base, submodules are modules."""

import importlib
import pkgutil
import subprocess
import sys
import types

import pytest

import weightsmith


PUBLIC = {
    "__version__",
    # errors
    "WeightsmithError", "CheckpointError", "CheckpointNotFoundError", "UnknownFormatError", "CorruptCheckpointError",
    "UnsafeCheckpointError", "RootError", "SaveError", "UsageError", "SelectorError", "PlanError", "ModelError",
    "AssignError", "TieError",
    # look
    "open", "Checkpoint", "TensorInfo", "select", "compile_selector", "summary", "Summary", "stats", "TensorStats",
    "StatsReport", "check", "HealthReport",
    # change
    "init_", "InitReport", "assign_", "update_", "AssignReport", "snapshot", "restore_", "Snapshot", "ties",
    "TieReport", "tie_", "untie_", "freeze_", "unfreeze_", "frozen", "FreezeReport", "freeze_state",
    "load_freeze_state_", "trainable", "param_groups", "ParamGroups", "GroupsReport", "cast_", "CastReport",
    # move
    "save", "SaveReport", "plan", "LoadPlan", "Rule", "load_rules", "load_", "build", "transfer", "LoadReport",
    "empty_init", "diff", "Diff", "convert", "ConvertReport", "report",
    # combine
    "merge", "merge_plan", "MergePlan", "MergeReport", "merge_lora", "extract_lora", "LoraReport",
    # scale out
    "save_dcp", "load_sharded_", "is_sharded",
    # trust
    "scan_globals", "GlobalsReport", "verify", "VerifyReport",
}


def test_the_public_api_is_exactly_these_names():
    assert len(weightsmith.__all__) == len(set(weightsmith.__all__))
    assert set(weightsmith.__all__) == PUBLIC


def test_every_submodule_imports_as_a_module_and_public_names_stay_what_they_name():
    # every submodule imported first: importing one binds it on its package, which must never
    # replace a public name (`weightsmith.summary` stays the function once `tables` is imported)
    names = [m.name for m in pkgutil.walk_packages(weightsmith.__path__, "weightsmith.")]
    assert {"weightsmith.warmstart.plan", "weightsmith.tables", "weightsmith.comparison"} <= set(names)
    for name in names:
        importlib.import_module(name)
    for name in names:
        assert _import_as(name) is sys.modules[name], name
    for name in set(weightsmith.__all__) - {"__version__"}:
        value = getattr(weightsmith, name)
        assert not isinstance(value, types.ModuleType), name
        assert value.__name__ == name, name
        assert getattr(sys.modules[value.__module__], name) is value, name
    for name in ("summary", "stats", "diff", "report"):  # once named like modules of their own
        assert isinstance(getattr(weightsmith, name), types.FunctionType), name


def _import_as(name: str) -> object:
    """What ``import <name> as m`` binds ``m`` to."""
    scope: dict[str, object] = {}
    exec(f"import {name} as m", scope)
    return scope["m"]


def test_plan_module_and_function_are_both_reachable():
    import weightsmith.warmstart.plan as m

    assert isinstance(m, types.ModuleType) and m.LoadPlan is weightsmith.LoadPlan
    assert callable(weightsmith.plan) and weightsmith.plan is m.plan


@pytest.mark.parametrize("name", weightsmith.__all__)
def test_every_exported_name_resolves(name):
    assert getattr(weightsmith, name) is not None


def test_errors_derive_from_one_base():
    errors = [getattr(weightsmith, n) for n in weightsmith.__all__ if n.endswith("Error")]
    assert len(errors) >= 10
    assert all(issubclass(e, weightsmith.WeightsmithError) for e in errors)
    assert issubclass(weightsmith.CheckpointNotFoundError, FileNotFoundError)


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError):
        weightsmith.no_such_function  # noqa: B018


def test_import_does_not_pull_torch():
    code = "import sys, weightsmith; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "weightsmith", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "inspect" in out.stdout
