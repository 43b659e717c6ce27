"""Every command's ``--json`` output validates against docs/json-schemas.md, and so does each example there."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import weightsmith as ws
from weightsmith.cli import cli

DOC = Path(__file__).resolve().parents[2] / "docs" / "json-schemas.md"
_BLOCK = re.compile(r"<!-- (schema|example): (\S+) -->\n```json\n(.*?)\n```", re.S)


def _blocks() -> tuple[dict[str, Any], dict[str, Any]]:
    schemas: dict[str, Any] = {}
    examples: dict[str, Any] = {}
    for kind, name, body in _BLOCK.findall(DOC.read_text(encoding="utf-8")):
        (schemas if kind == "schema" else examples)[name] = json.loads(body)
    return schemas, examples


SCHEMAS, EXAMPLES = _blocks()

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _type_ok(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def errors(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """The JSON Schema keywords the page uses: $ref (by $id), type, const, enum, minimum,
    required, properties, additionalProperties and items."""
    if "$ref" in schema:
        return errors(value, SCHEMAS[schema["$ref"]], where)
    out: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else types
        if not any(_type_ok(value, t) for t in names):
            return [f"{where}: {value!r} is not of type {types}"]
    if "const" in schema and value != schema["const"]:
        out.append(f"{where}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{where}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        out.append(f"{where}: {value!r} < {schema['minimum']}")
    if isinstance(value, dict):
        out += [f"{where}: missing {k!r}" for k in schema.get("required", ()) if k not in value]
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                out += errors(v, props[k], f"{where}.{k}")
            elif extra is False:
                out.append(f"{where}: unexpected field {k!r}")
            elif isinstance(extra, dict):
                out += errors(v, extra, f"{where}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            out += errors(v, schema["items"], f"{where}[{i}]")
    return out


def validate(data: dict[str, Any]) -> None:
    name = data["schema"]
    assert name in SCHEMAS, f"{name} is not documented in {DOC.name}"
    problems = errors(data, SCHEMAS[name])
    assert not problems, problems[:10]


def test_every_schema_has_an_example_that_validates() -> None:
    assert set(SCHEMAS) == set(EXAMPLES) and len(SCHEMAS) >= 10
    for name, schema in SCHEMAS.items():
        assert schema["$id"] == name and EXAMPLES[name]["schema"] == name
        validate(EXAMPLES[name])


def test_the_checker_catches_a_wrong_output() -> None:
    bad = {**EXAMPLES["weightsmith.diff/1"], "equal": "no"}
    del bad["tensors"]
    assert errors(bad, SCHEMAS["weightsmith.diff/1"]) == ["$: missing 'tensors'",
                                                         "$.equal: 'no' is not of type boolean"]
    extra = {**EXAMPLES["weightsmith.check/1"], "surprise": 1}  # check/1 lists its parts exactly
    assert errors(extra, SCHEMAS["weightsmith.check/1"]) == ["$: unexpected field 'surprise'"]


@pytest.fixture
def files(tmp_path: Path, mlp: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> Path:
    ws.save(mlp, tmp_path / "a.safetensors")
    changed = {k: v + 1 if k == "2.bias" else v for k, v in mlp.state_dict().items()}
    ws.save(changed, tmp_path / "b.safetensors")
    torch.save(mlp.state_dict(), tmp_path / "a.pt")
    save_file({"w": torch.tensor([1.0, float("nan")]), "b": torch.zeros(3)}, str(tmp_path / "bad.safetensors"))
    (tmp_path / "json_factories.py").write_text(textwrap.dedent("""
        from torch import nn

        def small():
            return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_every_command_json_validates(files: Path) -> None:
    commands = [
        ("inspect", "a.safetensors"), ("inspect", "a.pt", "--fold"), ("inspect", "json_factories:small"),
        ("check", "a.pt"), ("check", "a.safetensors", "--verify"), ("check", "bad.safetensors"),
        ("diff", "a.safetensors", "b.safetensors"), ("diff", "a.safetensors", "a.pt"),
        ("convert", "a.pt", "c.safetensors"), ("plan", "a.safetensors", "--into", "b.safetensors"),
        ("warmstart", "a.safetensors", "--into", "b.safetensors", "-o", "w.safetensors"),
    ]
    seen = set()
    for args in commands:
        result = CliRunner().invoke(cli, [*args, "--json"])
        assert result.exit_code in (0, 1), (args, result.output)
        data = json.loads(result.stdout)
        validate(data)
        seen.add(data["schema"])
        for part in ("globals", "verify", "health"):
            if part in data:
                seen.add(data[part]["schema"])
    assert seen == set(SCHEMAS)
