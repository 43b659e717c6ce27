"""weightsmith: parameter management for PyTorch.

Look at, change and move model weights with one safe, verifiable call each. The public API
is listed in ``__all__``; it is imported lazily so that ``weightsmith inspect`` can read a
checkpoint's header without paying for ``import torch``.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import (
    AssignError,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    ModelError,
    PlanError,
    RootError,
    SaveError,
    SelectorError,
    TieError,
    UnknownFormatError,
    UsageError,
    UnsafeCheckpointError,
    WeightsmithError,
)

__version__ = "0.1.0"

# public name -> module that defines it (imported on first use). No submodule is named like a
# public name: importing a submodule binds it on the package, and must never hide a function.
_LAZY: dict[str, str] = {
    # look
    "open": "checkpoint",
    "Checkpoint": "checkpoint",
    "TensorInfo": "checkpoint",
    "select": "selectors",
    "compile_selector": "selectors",
    "summary": "tables",
    "Summary": "tables",
    "stats": "tensor_stats",
    "TensorStats": "tensor_stats",
    "StatsReport": "tensor_stats",
    "check": "health",
    "HealthReport": "health",
    # change
    "init_": "init",
    "InitReport": "init",
    "assign_": "assign",
    "update_": "assign",
    "AssignReport": "assign",
    "snapshot": "snapshots",
    "restore_": "snapshots",
    "Snapshot": "snapshots",
    "ties": "tie",
    "TieReport": "tie",
    "tie_": "tie",
    "untie_": "tie",
    "freeze_": "freeze",
    "unfreeze_": "freeze",
    "frozen": "freeze",
    "FreezeReport": "freeze",
    "freeze_state": "freeze",
    "load_freeze_state_": "freeze",
    "trainable": "freeze",
    "param_groups": "groups",
    "ParamGroups": "groups",
    "GroupsReport": "groups",
    "cast_": "cast",
    "CastReport": "cast",
    # move
    "save": "saving",
    "SaveReport": "save_report",
    "plan": "warmstart.plan",
    "LoadPlan": "warmstart.plan",
    "Rule": "warmstart.keymap",
    "load_rules": "warmstart.keymap",
    "load_": "warmstart.load",
    "build": "warmstart.load",
    "transfer": "warmstart.load",
    "LoadReport": "warmstart.load",
    "empty_init": "warmstart.load",
    "diff": "comparison",
    "Diff": "comparison",
    "convert": "conversion",
    "ConvertReport": "conversion",
    "report": "html_report",
    "merge": "merging",
    "merge_plan": "merging",
    "MergePlan": "merging",
    "MergeReport": "merging",
    "merge_lora": "merging",
    "extract_lora": "merging",
    "LoraReport": "merging",
    # scale out
    "save_dcp": "distributed",
    "load_sharded_": "distributed",
    "is_sharded": "distributed",
    # trust
    "scan_globals": "trust",
    "GlobalsReport": "trust",
    "verify": "trust",
    "VerifyReport": "trust",
}

__all__ = [
    "__version__",
    "WeightsmithError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "UnknownFormatError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "RootError",
    "SaveError",
    "UsageError",
    "SelectorError",
    "PlanError",
    "ModelError",
    "AssignError",
    "TieError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'weightsmith' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

