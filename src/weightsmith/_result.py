"""Conventions shared by every result object: text, dict, JSON and rich rendering."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar

__all__ = ["Result", "to_plain"]


def to_plain(value: Any) -> Any:
    """Turn dataclasses, tuples, paths and dtypes into JSON-ready builtins."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "to_dict"):
            return value.to_dict()
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them readable rather than invalid
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class Result:
    """Mixin for result dataclasses.

    Subclasses set ``SCHEMA`` (``"weightsmith.<kind>/1"``) and implement ``_rich_()``
    returning a rich renderable; ``__str__`` renders it as plain text.
    """

    SCHEMA: ClassVar[str] = "weightsmith.result/1"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the result, schema first."""
        body = {f.name: to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return {"schema": self.SCHEMA, **body}

    def to_json(self, *, indent: int | None = 2) -> str:
        """The result as JSON text, with its ``"schema"`` field."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def _rich_(self) -> Any:  # pragma: no cover - overridden
        return repr(self)

    def __rich__(self) -> Any:
        return self._rich_()

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=120, record=True, color_system=None, force_terminal=False,
                          file=_NullFile())
        console.print(self._rich_())
        return console.export_text().rstrip("\n")


class _NullFile:
    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        pass
