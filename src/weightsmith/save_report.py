"""`SaveReport`: what a save wrote, in any format (local files or a DCP folder)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._result import Result

__all__ = ["SaveReport"]


@dataclass
class SaveReport(Result):
    """What `save` wrote."""

    SCHEMA = "weightsmith.save/1"
    path: str
    format: str
    files: list[str]
    tensors: int
    nbytes: int
    ties: dict[str, str] = field(default_factory=dict)

    def _rich_(self) -> str:
        tied = f", {len(self.ties)} tied key(s) stored once" if self.ties else ""
        return (f"saved {self.tensors} tensors ({self.nbytes:,} bytes{tied}) as {self.format} "
                f"to {self.path}")
