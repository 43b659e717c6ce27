"""Health checks: turn per-tensor statistics into named findings (NaN, Inf, dead, exploding)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import UsageError
from ._result import Result
from .selectors import Selector
from .tensor_stats import CHUNK_BYTES, Progress, StatsReport, TensorStats, stats

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Finding", "HealthReport", "check", "CHECKS", "ERRORS", "MAX_ABS"]

# every kind of finding, in the order they are reported for one tensor
CHECKS: tuple[str, ...] = ("nan", "inf", "all_zero", "constant", "exploding")
# the kinds that break a model; the others (all-zero, constant) are normal in healthy models
# (a zero-initialized bias, a LayerNorm never trained away from 1) and are warnings by default
ERRORS: tuple[str, ...] = ("nan", "inf", "exploding")
MAX_ABS = 1e4  # trained weights rarely leave |w| < 100; 1e4 means something diverged

_FLOATING = ("float", "bfloat", "complex")


@dataclass
class Finding:
    """One problem in one tensor.

    Attributes:
        key: the tensor's name.
        kind: one of `CHECKS`.
        value: the count (``nan``, ``inf``), the constant value (``all_zero``, ``constant``)
            or the largest magnitude (``exploding``).
        message: a sentence saying what was found.
        severity: ``"error"`` (fails the check) or ``"warning"`` (reported, passes).
    """

    key: str
    kind: str
    value: float
    message: str
    severity: str = "error"


@dataclass
class HealthReport(Result):
    """Findings over every tensor checked; ``ok`` when none of them is an error.

    Attributes:
        source: what was checked.
        checked: how many tensors were checked.
        findings: the problems, tensor by tensor.
        max_abs: the magnitude above which a tensor counts as exploding.
        skipped: names that could not be read (meta, sharded) -> why.
    """

    SCHEMA: ClassVar[str] = "weightsmith.health/1"

    source: str
    checked: int
    findings: list[Finding] = field(default_factory=list)
    max_abs: float = MAX_ABS
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no finding is an error (warnings alone pass)."""
        return not self.errors

    @property
    def errors(self) -> list[Finding]:
        """Findings that fail the check (by default NaN, Inf, exploding)."""
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        """Findings reported without failing (by default all-zero and constant tensors)."""
        return [f for f in self.findings if f.severity != "error"]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready builtins, ``ok`` and the error / warning counts included."""
        return {**super().to_dict(), "ok": self.ok, "errors": len(self.errors), "warnings": len(self.warnings)}

    def _rich_(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        skipped = (f" ({len(self.skipped)} skipped: {', '.join(self.skipped)})"
                   if self.skipped else "")
        if self.ok and not self.checked and self.skipped:  # "healthy" would claim what was not looked at
            return Text(f"nothing checked: every tensor was skipped{skipped}")
        if not self.findings:
            return Text(f"healthy: {_tensors(self.checked)} checked{skipped}")
        table = Table(title=f"health of {self.source}")
        for col in ("tensor", "finding", "severity", "value", "detail"):
            table.add_column(col, overflow="fold")
        for f in self.findings:
            table.add_row(f.key, f.kind, f.severity, f"{f.value:.6g}", f.message)
        tensors = len({f.key for f in self.findings})
        errors, warnings = len(self.errors), len(self.warnings)
        verdict = "healthy" if self.ok else "unhealthy"
        return Group(table, Text(f"{verdict}: {errors} error{'s' * (errors != 1)}, {warnings} warning"
                                 f"{'s' * (warnings != 1)} in {tensors} of {_tensors(self.checked)} "
                                 f"checked{skipped}"))


def _tensors(n: int) -> str:
    return f"{n:,} tensor{'s' * (n != 1)}"


def check(
    target: nn.Module | Mapping[str, Any] | StatsReport | str | os.PathLike[str],
    *,
    select: Selector | None = None,
    max_abs: float = MAX_ABS,
    checks: Collection[str] = CHECKS,
    errors: Collection[str] = ERRORS,
    chunk_bytes: int = CHUNK_BYTES,
    progress: Progress | None = None,
) -> HealthReport:
    """Check every floating-point tensor for NaN, Inf, all-zero, constant and exploding values.

    Integer and bool tensors (step counters, index buffers) are measured but not judged.

    Args:
        target: a model, a state dict, an opened checkpoint, or a `StatsReport` already made.
        select: only these names (see `weightsmith.selectors`); not with a `StatsReport`.
        max_abs: a tensor whose largest finite magnitude exceeds this is ``exploding``.
        checks: the kinds of finding to look for, a subset of `CHECKS`. A freshly built
            model has all-zero biases and constant norm weights by design; leave out
            ``"all_zero"`` and ``"constant"`` to check one.
        chunk_bytes: passed to `stats`.
        progress: passed to `stats`: ``progress(done_bytes, total_bytes, key)``.

    Returns:
        A `HealthReport`; ``report.ok`` is the verdict.

    Raises:
        ValueError: an unknown check, a bad ``max_abs``, or ``select`` with a `StatsReport`.

    >>> import torch
    >>> r = check({"w": torch.tensor([1.0, float("nan")]), "b": torch.tensor([0.5, -0.5])})
    >>> r.ok, [(f.key, f.kind, f.value) for f in r.findings]
    (False, [('w', 'nan', 1)])
    """
    problems = []
    for label, kinds in (("checks", checks), ("errors", errors)):
        unknown = sorted(set(kinds) - set(CHECKS))
        if unknown or isinstance(kinds, str):
            problems.append(f"unknown {label} {unknown or kinds!r}; choose from {', '.join(CHECKS)}")
    if not isinstance(max_abs, (int, float)) or not max_abs > 0:
        problems.append(f"max_abs must be a positive number, got {max_abs!r}")
    if isinstance(target, StatsReport) and select is not None:
        problems.append("select= cannot narrow a StatsReport; pass select= to stats() instead")
    if problems:
        raise UsageError("; ".join(problems))
    report = target if isinstance(target, StatsReport) else stats(
        target, select=select, chunk_bytes=chunk_bytes, progress=progress)
    wanted, failing = set(checks), set(errors)
    findings = [dataclasses.replace(f, severity="error" if f.kind in failing else "warning")
                for s in report.tensors for f in _judge(s, max_abs) if f.kind in wanted]
    return HealthReport(report.source, len(report.tensors), findings, float(max_abs),
                        dict(report.skipped))


def _judge(s: TensorStats, max_abs: float) -> list[Finding]:
    if not s.dtype.startswith(_FLOATING):
        return []
    out = []
    if s.nan_count:
        out.append(Finding(s.key, "nan", s.nan_count,
                           f"{s.nan_count:,} of {s.numel:,} values are NaN"))
    if s.inf_count:
        out.append(Finding(s.key, "inf", s.inf_count,
                           f"{s.inf_count:,} of {s.numel:,} values are infinite"))
    if s.numel and s.zero_fraction == 1.0:
        out.append(Finding(s.key, "all_zero", 0.0, f"all {s.numel:,} values are zero"))
    elif s.numel > 1 and s.std == 0.0 and s.finite:
        out.append(Finding(s.key, "constant", s.mean,
                           f"all {s.numel:,} values equal {s.mean:.6g}"))
    if s.absmax > max_abs:
        out.append(Finding(s.key, "exploding", s.absmax,
                           f"largest magnitude {s.absmax:.6g} exceeds {max_abs:g}"))
    return out
