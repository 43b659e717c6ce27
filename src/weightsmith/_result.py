"""Conventions shared by every result object: text, dict, JSON and rich rendering."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar

__all__ = ["Result", "Rendered", "to_plain"]


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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # set before @dataclass runs, which then keeps it: in a REPL or a notebook a result
        # shows as its table, not as a dataclass repr
        super().__init_subclass__(**kwargs)
        if "__repr__" not in cls.__dict__:
            cls.__repr__ = Result.__repr__  # type: ignore[method-assign]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the result, schema first (fields marked ``internal`` left out)."""
        body = {f.name: to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if not f.metadata.get("internal")}
        return {"schema": self.SCHEMA, **body}

    def to_json(self, *, indent: int | None = 2) -> str:
        """The result as JSON text, with its ``"schema"`` field."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def _rich_(self) -> Any:  # results without a table: the fields, as a dataclass shows them
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}"
                           for f in dataclasses.fields(self))  # type: ignore[arg-type]
        return f"{type(self).__name__}({fields})"

    def __rich__(self) -> Any:
        return self._rich_()

    def __str__(self) -> str:
        return _text(self._rich_())

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        """Jupyter: the table as preformatted HTML."""
        return _html(self._rich_())


class Rendered:
    """A rich renderable that shows as text in a REPL and as HTML in Jupyter
    (e.g. `Summary.modules_table`); ``rich`` prints it as the renderable itself."""

    def __init__(self, renderable: Any) -> None:
        self.renderable = renderable

    def __rich__(self) -> Any:
        return self.renderable

    def __str__(self) -> str:
        return _text(self.renderable)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        return _html(self.renderable)


def _text(renderable: Any) -> str:
    from rich.console import Console

    console = Console(width=120, record=True, color_system=None, force_terminal=False,
                      file=_NullFile())
    console.print(renderable)
    return console.export_text().rstrip("\n")


def _html(renderable: Any) -> str:
    import html

    return ('<pre style="font-family: ui-monospace, monospace; line-height: 1.25">'
            f"{html.escape(_text(renderable))}</pre>")


class _NullFile:
    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        pass
