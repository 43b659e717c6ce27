"""Merge configurations from files: weightsmith's TOML, and mergekit's YAML for the same methods.

weightsmith TOML (paths relative to the file)::

    method = "ties"
    base = "base.safetensors"
    sources = ["a.safetensors", "b.safetensors"]
    weights = [0.5, 0.5]
    dtype = "bfloat16"
    out = "merged.safetensors"        # optional; -o on the command line wins
    [parameters]
    density = 0.5
    t = [["**.attn.**", [0, 0.5, 1]], ["**", 0.5]]

mergekit YAML: ``merge_method``, ``base_model``, ``models`` (each ``model`` with
``parameters: weight, density``), global ``parameters`` (``t``, ``lambda``, ``normalize``,
``rescale``, ``density``, ...), ``dtype``/``out_dtype``, and ``slices`` (layer ranges for
``passthrough``; for the other methods, slices whose sources share one range). A parameter
given as ``[{filter: self_attn, value: [0, 1]}, {value: 0.5}]`` becomes selector pairs, the
filter matched as a substring of the key as mergekit does. Models must be local paths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError

__all__ = ["MergeConfig", "read_config"]

_MERGEKIT_GLOBAL = {"t": "t", "lambda": "lambda_", "normalize": "normalize", "rescale": "rescale",
                    "density": "density"}
_MERGEKIT_IGNORED = {"int8_mask"}  # memory options of mergekit's own engine: nothing to do here
_MERGEKIT_TOP = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "slices",
                 "tokenizer_source", "tokenizer", "chat_template", "name"}


@dataclass
class MergeConfig:
    """What a configuration file asks for, as `merge` arguments."""

    sources: list[str]
    method: str
    base: str | None = None
    weights: list[Any] | None = None
    dtype: str | None = None
    out: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def read_config(path: str | Path) -> MergeConfig:
    """Read a ``.toml`` (weightsmith) or ``.yaml``/``.yml`` (mergekit) merge configuration."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"{path}: cannot be read ({e.strerror or e})") from e
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise UsageError(f"{path}: reading mergekit YAML needs PyYAML (pip install pyyaml)") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UsageError(f"{path}: not valid YAML ({e})") from e
        return _from_mergekit(data, path.parent, path)
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML ({e})") from e
    return _from_toml(data, path.parent, path)


def _local(name: Any, root: Path, where: Path) -> str:
    if not isinstance(name, str):
        raise UsageError(f"{where}: a model must be a path, got {name!r}")
    if "+" in name and not (root / name).exists():
        raise UsageError(f"{where}: {name!r} applies a LoRA on the fly (model+lora); merge it first with "
                         "weightsmith.merge_lora")
    p = Path(name).expanduser()
    p = p if p.is_absolute() else root / p
    if not p.exists():
        raise UsageError(f"{where}: model {name!r} is not a local path ({p} does not exist); weightsmith merges "
                         "local files: download it first")
    return str(p)


def _from_toml(data: dict[str, Any], root: Path, where: Path) -> MergeConfig:
    known = {"method", "base", "sources", "weights", "dtype", "out", "parameters"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "method" not in data or "sources" not in data:
        raise UsageError(f"{where}: needs method = \"...\" and sources = [...]")
    params = {k: _pairs(v) for k, v in dict(data.get("parameters", {})).items()}
    if "slices" in params:
        params["slices"] = [tuple(s) for s in params["slices"]]
    out = data.get("out")
    return MergeConfig(sources=[_local(s, root, where) for s in data["sources"]], method=str(data["method"]),
                       base=_local(data["base"], root, where) if data.get("base") else None,
                       weights=[_pairs(w) for w in data["weights"]] if "weights" in data else None,
                       dtype=data.get("dtype"), out=str(root / out) if out else None, params=params)


def _pairs(value: Any) -> Any:
    """TOML arrays of [selector, value] pairs -> tuples (a gradient stays a list of numbers)."""
    if isinstance(value, list) and value and all(isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
                                                 for v in value):
        return [(v[0], v[1]) for v in value]
    return value


def _mergekit_value(value: Any, where: Path, name: str) -> Any:
    """A mergekit parameter value: a number, a gradient, or a list of {filter, value}."""
    if isinstance(value, (int, float, bool)) or (isinstance(value, list) and all(
            isinstance(v, (int, float)) for v in value)):
        return value
    if isinstance(value, list) and all(isinstance(v, dict) and "value" in v for v in value):
        return [(f"re:{re.escape(str(v['filter']))}" if v.get("filter") else "**", v["value"]) for v in value]
    raise UsageError(f"{where}: parameter {name}={value!r}: give a number, a list of numbers or "
                     "[{filter: ..., value: ...}, ...]")


def _from_mergekit(data: Any, root: Path, where: Path) -> MergeConfig:
    if not isinstance(data, dict) or "merge_method" not in data:
        raise UsageError(f"{where}: not a mergekit configuration (no merge_method)")
    notes: list[str] = []
    unknown = sorted(set(data) - _MERGEKIT_TOP)
    if unknown:
        raise UsageError(f"{where}: unsupported mergekit key(s) {', '.join(unknown)}")
    for k in ("tokenizer_source", "tokenizer", "chat_template"):
        if k in data:
            notes.append(f"{k} is not handled: only tensors are merged")
    method = str(data["merge_method"])
    base = _local(data["base_model"], root, where) if data.get("base_model") else None
    params: dict[str, Any] = {}
    for k, v in dict(data.get("parameters") or {}).items():
        if k in _MERGEKIT_IGNORED:
            continue
        if k not in _MERGEKIT_GLOBAL:
            raise UsageError(f"{where}: unsupported parameter {k!r}; supported: {', '.join(_MERGEKIT_GLOBAL)}")
        params[_MERGEKIT_GLOBAL[k]] = _mergekit_value(v, where, k)
    models: list[dict[str, Any]] = list(data.get("models") or [])
    if data.get("slices"):
        models, slices = _mergekit_slices(data["slices"], method, where)
        if slices is not None:
            params["slices"] = slices
        else:
            notes.append("the slice's layer_range is not applied: every layer of the models is merged")
    sources: list[str] = []
    weights: list[Any] = []
    densities: list[Any] = []
    for m in models:
        path = _local(m.get("model"), root, where)
        if base is not None and Path(path).resolve() == Path(base).resolve():
            continue  # mergekit lets the base appear among the models
        p = dict(m.get("parameters") or {})
        bad = set(p) - {"weight", "density"}
        if bad:
            raise UsageError(f"{where}: unsupported per-model parameter(s) {', '.join(sorted(bad))}")
        sources.append(path)
        weights.append(_mergekit_value(p.get("weight", 1.0), where, "weight"))
        if "density" in p:
            densities.append(_mergekit_value(p["density"], where, "density"))
    if densities:
        if len(densities) != len(sources):
            raise UsageError(f"{where}: give density for every model or for none")
        params["densities"] = densities
        params.pop("density", None)
    if method == "passthrough" and "slices" in params:
        # slices refer to models by position among the sources
        order = {s: i for i, s in enumerate(sources)}
        params["slices"] = [(order[_local(m, root, where)], a, b) for m, a, b in params["slices"]]
    has_weights = method in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
    return MergeConfig(sources=sources, method=method, base=base, weights=weights if has_weights else None,
                       dtype=data.get("out_dtype") or data.get("dtype"), params=params, notes=notes)


def _mergekit_slices(slices: Any, method: str, where: Path) -> tuple[list[dict[str, Any]], list[Any] | None]:
    models: list[dict[str, Any]] = []
    if method == "passthrough":
        out = []
        for s in slices:
            for src in s.get("sources", []):
                a, b = src["layer_range"]
                out.append((src["model"], int(a), int(b)))
                if all(m["model"] != src["model"] for m in models):
                    models.append({"model": src["model"]})
        return models, out
    if len(slices) != 1:
        raise UsageError(f"{where}: {method} with several slices is not supported; only passthrough stacks "
                         "slices (give one slice, or models:)")
    ranges = {tuple(src.get("layer_range", ())) for src in slices[0].get("sources", [])}
    if len(ranges) > 1:
        raise UsageError(f"{where}: the slice's sources have different layer ranges {sorted(ranges)}; "
                         f"{method} merges whole models")
    for src in slices[0].get("sources", []):
        models.append({"model": src["model"], "parameters": src.get("parameters") or {}})
    return models, None  # the caller notes that whole models are merged
