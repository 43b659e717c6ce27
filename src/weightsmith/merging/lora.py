"""LoRA adapters: fold a PEFT adapter into its base, or take one out of a fine-tune.

A PEFT LoRA adapter folder holds ``adapter_config.json`` (``r``, ``lora_alpha``,
``use_rslora``, ``fan_in_fan_out``, ``rank_pattern``, ``alpha_pattern``) and
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` (r × in) and
``...lora_B.weight`` (out × r); embeddings use ``lora_embedding_A`` (r × num) and
``lora_embedding_B`` (dim × r); a conv layer's A is a conv with the layer's kernel (r × in × k…)
and its B a 1×1 conv (out × r × 1…). Merging adds, to each module's weight,

    ΔW = s · (B @ A),  s = lora_alpha / r  (lora_alpha / √r with use_rslora),

transposed for embeddings and for layers stored in × out (transformers' ``Conv1D``): peft
decides that per layer by type; here a non-square weight's shape decides, a live base model's
layer types decide, and a square weight in a file follows ``fan_in_fan_out``. A DoRA adapter
(``use_dora``, a ``lora_magnitude_vector`` m per module) then rescales each output row of
V = W + ΔW to its trained magnitude: W' = m ⊙ V / ‖V‖, the norm taken over the row (every
input index, and a conv's kernel). Module names are aligned to the base's keys as
`weightsmith.plan` aligns a source to a target (a ``bert.`` or wrapper prefix on either side
needs no rule).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .._result import Result
from ..errors import CheckpointError, UsageError
from ..warmstart.keymap import align_prefixes
from ..errors import PlanError
from ._write import Stream, write
from .plan import Input, open_input

__all__ = ["merge_lora", "extract_lora", "LoraReport"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraReport(Result):
    """What `merge_lora` or `extract_lora` wrote.

    Attributes:
        path: the output; ``format`` as written (``safetensors``, ``sharded``, ``torch``,
            ``model``, or ``peft`` for an adapter folder).
        modules: the modules merged or extracted, each with its rank and scale.
        tensors: output keys; ``error``: for extraction, the largest relative Frobenius error
            ‖ΔW − B A‖ / ‖ΔW‖ over the modules (what the rank leaves out).
        notes: what was not captured or kept as it was.
        skipped: for extraction, each tensor that differs but is not in the adapter -> why.
    """

    SCHEMA: ClassVar[str] = "weightsmith.lora/1"
    path: str
    format: str
    files: list[str]
    modules: dict[str, dict[str, Any]]
    tensors: int
    error: float | None = None
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def _rich_(self) -> str:
        what = f"{len(self.modules)} LoRA module(s)"
        text = f"wrote {self.format} {self.path}: {what}, {self.tensors} tensors"
        if self.error is not None:
            text += f"; largest relative error of the rank {self.error:.3g}"
        lines = [text, *(f"note: {n}" for n in self.notes)]
        return "\n".join(lines + [f"skipped {k}: {why}" for k, why in self.skipped.items()])


# -- merge -------------------------------------------------------------------------------------
@dataclass
class _Module:
    target: str          # the base key of the weight
    a: str               # adapter keys
    b: str
    scale: float         # the LoRA scaling s (times merge_lora's ``scale`` for plain LoRA)
    rank: int
    transpose: bool      # stored in × out (embeddings, Conv1D): the update applies transposed
    magnitude: str | None = None  # DoRA: the adapter key of the magnitude vector
    dora_scale: float = 1.0       # DoRA: merge_lora's ``scale`` on the whole change


def _read_adapter(adapter: Any) -> tuple[dict[str, Any], Input, Path]:
    from ..io import hub

    folder = hub.fetch(adapter, ((CONFIG_NAME,), WEIGHTS_NAMES)) if hub.is_hub(adapter) else Path(adapter)
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME}; give a PEFT LoRA adapter folder (save_pretrained)")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG_NAME}: cannot be read as JSON ({e})") from e
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise UsageError(f"{folder}: peft_type is {config.get('peft_type')!r}; only LoRA adapters can be merged")
    weights = next((folder / n for n in WEIGHTS_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: no {' or '.join(WEIGHTS_NAMES)}")
    return config, open_input(weights), weights


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rule: a pattern applies to a module whose name ends with it (at a dot)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default



_LORA_KEY = re.compile(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?"
                       r"|(.+)\.(lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?")


def _lora_shapes(module: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], rank: int,
                 embedding: bool) -> tuple[tuple[int, ...] | None, str]:
    """The shape of B @ A as peft forms it (out, in) or a conv's (out, in, *kernel); or a problem."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        if a_shape[0] != rank or b_shape[1] != rank:
            return None, f"{module}: LoRA shapes A {list(a_shape)}, B {list(b_shape)} do not match rank {rank}"
        return (b_shape[0], a_shape[1]), ""
    # a conv layer: A is a conv with the layer's kernel (r, in, *k), B a 1×1 conv (out, r, 1, ...)
    if (not embedding and len(a_shape) == len(b_shape) >= 3 and a_shape[0] == rank and b_shape[1] == rank
            and all(d == 1 for d in b_shape[2:])):
        return (b_shape[0], *a_shape[1:]), ""
    return None, (f"{module}: LoRA shapes A {list(a_shape)}, B {list(b_shape)} are neither a Linear/Embedding/"
                  f"Conv1D pair of rank {rank} nor a conv pair (A: r × in × kernel, B: out × r × 1…; a grouped "
                  "conv's LoRA cannot be merged)")


def _plan_lora(base: Input, config: dict[str, Any], adapter: Input, scale: float, problems: list[str],
               layouts: dict[str, bool]) -> tuple[list[_Module], dict[str, str]]:
    """The modules to merge, and plain adapter keys (trained biases, saved modules) -> base key."""
    dora = bool(config.get("use_dora"))
    pairs: dict[str, dict[str, str]] = {}
    plain: dict[str, str] = {}
    for key in adapter.specs:
        name = key.removeprefix(_PEFT_PREFIX)
        m = _LORA_KEY.fullmatch(name)
        if m is None:
            plain[key] = name.replace(".modules_to_save", "")
            continue
        module = m.group(1) or m.group(3) or m.group(5)
        part = m.group(2) or m.group(4) or m.group(6)
        pairs.setdefault(module, {})[part] = key
    base_keys = list(base.specs)
    wanted = [f"{mod}.weight" for mod in pairs] + list(plain.values())
    prefix = align_prefixes(wanted, base_keys)
    modules: list[_Module] = []
    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", r_default))
    for module, parts in sorted(pairs.items()):
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a = parts.get("lora_embedding_A" if embedding else "lora_A")
        b = parts.get("lora_embedding_B" if embedding else "lora_B")
        magnitude = parts.get("lora_magnitude_vector")
        if a is None or b is None:
            problems.append(f"{module}: the adapter holds only {'a DoRA magnitude' if a is b else 'one'} of its "
                            "LoRA matrices")
            continue
        if magnitude is not None and not dora:
            problems.append(f"{module}: the adapter holds a DoRA magnitude vector, but its config has no "
                            "use_dora: true (a config that does not match its weights)")
            continue
        if dora and magnitude is None:
            problems.append(f"{module}: the config says use_dora, the adapter holds no lora_magnitude_vector "
                            "for this module")
            continue
        target = prefix(f"{module}.weight")
        if target not in base.specs:
            problems.append(f"{module}: no weight {target!r} in the base")
            continue
        rank = int(_pattern_value(config.get("rank_pattern"), module, r_default))
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, alpha_default))
        w_shape = tuple(base.specs[target][0])
        want, problem = _lora_shapes(module, adapter.specs[a][0], adapter.specs[b][0], rank, embedding)
        if want is None:
            problems.append(problem)
            continue
        transpose = embedding or bool(config.get("fan_in_fan_out"))
        if len(want) > 2:
            transpose = False
        # peft decides the layout per layer by its type (Conv1D stores in × out) and may rewrite
        # the config's fan_in_fan_out: a non-square weight's shape says which layout it has, a
        # live base model says it by type, a square one on a file follows the config
        elif not embedding and target in layouts:
            transpose = layouts[target]
        elif not embedding and want[0] != want[1]:
            transpose = want[::-1] == w_shape
        if (want[::-1] if transpose else want) != w_shape:
            problems.append(f"{module}: B @ A is {list(want)}, the base weight {target} is {list(w_shape)}")
            continue
        if magnitude is not None:
            n = math.prod(adapter.specs[magnitude][0])
            if n != want[0]:
                problems.append(f"{module}: the DoRA magnitude has {n} values, the layer {want[0]} outputs "
                                f"(shape {list(adapter.specs[magnitude][0])})")
                continue
        s = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        if magnitude is None:
            modules.append(_Module(target, a, b, s * scale, rank, transpose))
        else:
            modules.append(_Module(target, a, b, s, rank, transpose, magnitude, scale))
    replaced: dict[str, str] = {}
    for key, name in plain.items():
        target = prefix(name)
        if target not in base.specs:
            problems.append(f"{key}: the adapter holds it, the base has no {target!r}")
        elif adapter.specs[key][0] != base.specs[target][0]:
            problems.append(f"{key}: shape {list(adapter.specs[key][0])}, the base's {target} "
                            f"{list(base.specs[target][0])}")
        else:
            replaced[target] = key
    return modules, replaced


def _merged(w: Any, m: _Module, lora: Input) -> Any:
    """One module's merged weight in float32, computed as peft's ``merge_and_unload()`` does.

    In the layer's (out, in…) view V = W + s·B A; plain LoRA keeps V, DoRA rescales each output
    row to its trained magnitude: m ⊙ V / ‖V‖ (the norm over everything but the output index,
    taken of the unmerged weight plus the update, as peft takes it).
    """
    w = w.float()
    a = lora.tensor(m.a).float()
    b = lora.tensor(m.b).float()
    view = w.T if m.transpose else w.reshape(w.shape[0], -1)
    delta = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
    new = view + m.scale * delta
    if m.magnitude is not None:
        magnitude = lora.tensor(m.magnitude).float().reshape(-1)
        new = (magnitude / new.norm(dim=1))[:, None] * new
        if m.dora_scale != 1.0:  # a fraction of the whole change, as ``scale`` is for plain LoRA
            new = view + m.dora_scale * (new - view)
    return new.T if m.transpose else new.reshape(w.shape)


def _layouts(model: Any) -> dict[str, bool]:
    """For a live model: weight key -> whether it is stored in × out (transformers' Conv1D)."""
    return {k: kind == "conv1d_t" for k, kind in _kinds(model).items() if kind in ("linear", "conv1d_t",
                                                                                    "embedding", "other2d")}


def _kinds(model: Any) -> dict[str, str]:
    """For a live model: weight key -> ``linear``, ``conv1d_t`` (Conv1D, in × out), ``embedding``,
    ``conv`` (``nn.Conv1d/2d/3d``), ``other2d`` or ``other``."""
    if not hasattr(model, "named_modules"):
        return {}
    import torch.nn as nn

    out = {}
    for name, mod in model.named_modules():
        weight = getattr(mod, "weight", None)
        if not hasattr(weight, "dim"):
            continue
        key = f"{name}.weight" if name else "weight"
        if type(mod).__name__ == "Conv1D":
            out[key] = "conv1d_t"
        elif isinstance(mod, nn.Linear):
            out[key] = "linear"
        elif isinstance(mod, nn.Embedding):
            out[key] = "embedding"
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            out[key] = "conv"
        else:
            out[key] = "other2d" if weight.dim() == 2 else "other"
    return out


def merge_lora(base: Any, adapter: str | Path, out: Any, *, scale: float = 1.0, dtype: Any = None,
               max_shard_size: int | str | None = None, trust: bool = False) -> LoraReport:
    """Fold a PEFT LoRA adapter into its base model's weights: W' = W + scale · s · B @ A.

    The same result as peft's ``merge_and_unload()``, without building the model: the base is
    read tensor by tensor from its memory-mapped file and written atomically (or loaded all or
    nothing into an ``nn.Module`` given as ``out``). The product is computed in float32.
    Linear, Embedding, transformers ``Conv1D`` and ``nn.Conv1d/2d/3d`` layers are merged; a DoRA
    adapter (``use_dora``) has each output row of W + s·B A rescaled to its trained magnitude,
    m ⊙ V / ‖V‖, as peft does.

    Args:
        base: the base model: a path, a `Checkpoint`, a state dict or a model.
        adapter: the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), or a
            Hub source ``hf://ORG/NAME[@REVISION][/SUBFOLDER]`` holding one.
        out: a path or an ``nn.Module``, as for `merge`.
        scale: an extra factor on every module's change W' − W (1: as trained).
        dtype: the output dtype of floating tensors (default: the base's).
        max_shard_size, trust: as for `merge`.

    Raises:
        PlanError: the adapter does not fit the base (every problem listed); nothing was written.

    >>> import weightsmith as ws                                                  # doctest: +SKIP
    >>> ws.merge_lora("base.safetensors", "my-adapter/", "merged.safetensors")   # doctest: +SKIP
    """
    from ..io._dtypes import to_torch
    from .plan import is_float, output_dtype_name

    src = open_input(base, trust=trust)
    config, lora, weights_path = _read_adapter(adapter)
    problems: list[str] = []
    modules, replaced = _plan_lora(src, config, lora, scale, problems, _layouts(base))
    if problems:
        raise PlanError(f"the adapter {adapter} does not fit the base {src.name}:\n  " + "\n  ".join(problems),
                        problems=problems)
    out_dtype = output_dtype_name(dtype)
    by_target = {m.target: m for m in modules}
    aliases = {k: g[0] for g in src.ties for k in g[1:]}
    held: list[tuple[Input, str]] = []

    def produce(key: str) -> Any:
        t = src.tensor(key)
        held.append((src, key))
        target = to_torch(_out_dtype(key))
        if key in replaced:
            t = lora.tensor(replaced[key])
        m = by_target.get(key)
        if m is None:
            return t.to(target) if t.dtype != target else t
        return _merged(t, m, lora).to(target)

    def release() -> None:
        for inp, key in held:
            inp.release(key)
        held.clear()

    def _out_dtype(key: str) -> str:
        dt = src.specs[key][1]
        return out_dtype if out_dtype is not None and is_float(dt) else dt

    entries = [(k, src.specs[k][0], _out_dtype(k)) for k in src.specs if k not in aliases]
    inputs = [p for p in (src.path, weights_path) if p is not None]
    stream = Stream(entries, produce, release, aliases, {"format": "pt"}, None, inputs)
    try:
        where, fmt, files = write(stream, out, max_shard_size=max_shard_size)
    finally:
        src.close()
        lora.close()
    done = {m.target: {"rank": m.rank, "scale": m.scale, **({"dora": True} if m.magnitude else {})}
            for m in modules}
    return LoraReport(where, fmt, files, done,
                      len(src.specs), notes=[f"{len(replaced)} tensor(s) replaced by the adapter's own copy"]
                      if replaced else [])


# -- extract -----------------------------------------------------------------------------------
_NOT_A_LAYER = ("a {n}-D tensor: peft's LoRA adapts Linear, Embedding and Conv layers' weights, and has no "
                "low-rank form for a norm, a bias or a vector")


def _skip_reason(key: str, shape: tuple[int, ...], kind: str | None, *, picked: bool | None, emb: bool,
                 embedding_like: bool, layer: Any) -> str | None:
    """Why a weight that differs cannot (or, by the selectors, should not) go into the adapter.

    ``picked``: True or False by ``target``, None when there is none (every ``*.weight``)."""
    if picked is False and not emb:
        return "not selected by target"
    if len(shape) < 2:
        return _NOT_A_LAYER.format(n=len(shape))
    if picked is None and not emb and not key.endswith(".weight"):
        return "not a layer's weight (the name does not end in .weight); select it with target= to extract it"
    if len(shape) == 2:
        if kind in ("conv", "other", "other2d") and not emb:
            return f"a 2-D weight of a {type(layer).__name__}, a layer peft's LoRA does not adapt"
        if embedding_like and not emb:
            return ("an embedding: pass embeddings= (a selector) to store it as lora_embedding_A/B, "
                    "as peft's LoRA does for nn.Embedding")
        return None
    if emb:
        return f"a {len(shape)}-D tensor cannot be an embedding's weight"
    if len(shape) > 5:
        return f"a {len(shape)}-D tensor: peft's LoRA adapts conv layers of 1 to 3 spatial dimensions only"
    if kind is not None and kind != "conv":
        return f"a {len(shape)}-D weight of a {type(layer).__name__}, a layer peft's LoRA does not adapt"
    if layer is not None and getattr(layer, "groups", 1) != 1:
        return (f"a grouped convolution (groups={layer.groups}): its LoRA is block-diagonal, which a "
                "low-rank difference of the whole weight does not give, and peft cannot merge it")
    if layer is not None and any(d != 1 for d in getattr(layer, "dilation", (1,))):
        return (f"a dilated convolution (dilation={tuple(layer.dilation)}): peft's LoRA applies its A "
                "without dilation, so the adapter would not reproduce the weight")
    return None


def extract_lora(base: Any, tuned: Any, out: str | Path, *, rank: int, target: Any = None,
                 embeddings: Any = None, transposed: Any = None, trust: bool = False) -> LoraReport:
    """Write a PEFT LoRA adapter folder approximating ``tuned − base`` at ``rank``.

    For each floating layer weight that differs, the truncated SVD of the difference (a conv
    weight's seen as out × (in · kernel)), ΔW ≈ U_r S_r V_rᵀ, is split as B = U_r √S_r,
    A = √S_r V_rᵀ (``lora_alpha = r``, so the scale is 1): the best rank-r approximation
    (Eckart–Young). A conv layer's A is stored as a conv with the layer's kernel
    (r × in × k…) and its B as a 1×1 conv (out × r × 1…), as peft builds LoRA for
    ``nn.Conv1d/2d/3d``. peft loads the folder with ``PeftModel.from_pretrained(base_model, out)``.

    Args:
        base, tuned: the models (paths, checkpoints, state dicts or models); keys are aligned.
        out: the adapter folder, written atomically (config last).
        rank: the LoRA rank (smaller for a module whose weight is smaller).
        target: a selector of the weight keys to extract (default: every 2- to 5-D floating
            ``*.weight`` that differs, embeddings excluded unless named by ``embeddings``).
        embeddings: a selector of embedding weights (stored as ``lora_embedding_A/B``, which
            peft expects for ``nn.Embedding`` modules).
        transposed: a selector of weights stored in × out (transformers' ``Conv1D``, as in GPT-2),
            whose update peft applies transposed. When ``base`` is a live model its layer types
            say this, and these two selectors are not needed for Conv1D layers; its layer types
            also keep out what peft's LoRA cannot express (grouped or dilated convs, other layers).

    Returns:
        a `LoraReport`; ``error`` is the largest relative error left by the rank, and
        ``skipped`` names every tensor that differs but is not in the adapter, with the reason.
    """
    import torch

    from ..selectors import compile_selector

    if not isinstance(rank, int) or rank < 1:
        raise UsageError(f"rank must be a positive integer, got {rank!r}")
    b_in, t_in = open_input(base, trust=trust), open_input(tuned, trust=trust)
    prefix = align_prefixes(list(t_in.specs), list(b_in.specs))
    mapping = {prefix(k): k for k in t_in.specs}
    pick = compile_selector(target) if target is not None else None
    emb = compile_selector(embeddings) if embeddings is not None else None
    flip = compile_selector(transposed) if transposed is not None else None
    kinds = _kinds(base)
    layers = dict(base.named_modules()) if kinds else {}
    tensors: dict[str, Any] = {}
    modules: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {k: "in the tuned model, not in the base" for k in t_in.specs
                               if prefix(k) not in b_in.specs}
    problems = [f"{k}: in the base, not in the tuned model" for k in b_in.specs if k not in mapping]
    worst = 0.0
    for key, (shape, dtype) in b_in.specs.items():
        tk = mapping.get(key)
        if tk is None:
            continue
        if t_in.specs[tk][0] != shape:
            problems.append(f"{key}: shape {list(shape)} in the base, {list(t_in.specs[tk][0])} tuned")
            continue
        w0, w1 = b_in.tensor(key), t_in.tensor(tk)
        if not dtype.startswith(("float", "bfloat")):
            same = w0.shape == w1.shape and w0.dtype == w1.dtype and bool(torch.equal(w0, w1))
            b_in.release(key)
            t_in.release(tk)
            if not same:
                skipped[key] = f"a {dtype} tensor (a buffer, not a trained weight): a LoRA adapter holds no copy"
            continue
        delta = w1.float() - w0.float()
        b_in.release(key)
        t_in.release(tk)
        if not bool(delta.any()):
            continue
        module = key.removesuffix(".weight")
        kind = kinds.get(key)
        is_emb = emb is not None and emb(key)
        if kind == "embedding" and (is_emb or (pick is not None and pick(key))):
            is_emb = True  # a live model says it is one: peft wants lora_embedding_A/B for it
        picked = bool(pick(key)) if pick is not None else None
        embedding_like = kind == "embedding" or (kind is None and "embed" in module.rsplit(".", 1)[-1])
        reason = _skip_reason(key, shape, kind, picked=picked, emb=is_emb,
                              embedding_like=embedding_like and pick is None, layer=layers.get(module))
        if reason is not None:
            skipped[key] = reason
            continue
        if len(shape) == 2 and (is_emb or kind == "conv1d_t" or (flip is not None and flip(key))):
            delta = delta.T  # peft applies (B @ A)ᵀ to embeddings and Conv1D weights
        flat = delta.reshape(delta.shape[0], -1)
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        b_mat = (u[:, :r] * root).contiguous()
        a_mat = (root[:, None] * vh[:r]).contiguous()
        if len(shape) > 2:  # conv: A a conv with the layer's kernel, B a 1×1 conv
            a_mat = a_mat.reshape(r, *shape[1:])
            b_mat = b_mat.reshape(shape[0], r, *(1,) * (len(shape) - 2))
        worst = max(worst, float(s[r:].norm() / s.norm()) if s.norm() > 0 else 0.0)
        if is_emb:
            tensors[f"{_PEFT_PREFIX}{module}.lora_embedding_A"] = a_mat
            tensors[f"{_PEFT_PREFIX}{module}.lora_embedding_B"] = b_mat
        else:
            tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = a_mat
            tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = b_mat
        modules[module] = {"rank": r, "scale": 1.0}
    if problems:
        raise PlanError(f"{t_in.name} does not fit {b_in.name}:\n  " + "\n  ".join(problems[:20]), problems=problems)
    if not modules:
        why = "".join(f"\n  {k}: {v}" for k, v in list(skipped.items())[:10])
        raise UsageError(f"no layer weight that LoRA can express differs between {b_in.name} and {t_in.name}: "
                         f"nothing to extract{why}")
    ranks = {m: v["rank"] for m, v in modules.items()}
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": sorted(modules),
              "rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != rank},
              "alpha_pattern": {re.escape(m): r for m, r in ranks.items() if r != rank},
              "use_rslora": False, "fan_in_fan_out": False, "bias": "none", "lora_dropout": 0.0,
              "inference_mode": True, "base_model_name_or_path": str(b_in.path) if b_in.path else None,
              "task_type": None, "modules_to_save": None, "init_lora_weights": True}
    folder = Path(out)
    from ..io.atomic import atomic_folder, new_file
    from ..io.writers import Entries, write_safetensors
    from ..io.writers.safetensors import file_metadata

    ours = {WEIGHTS_NAMES[0], CONFIG_NAME}
    with atomic_folder(folder, keep=lambda name: name not in ours) as stage:  # a README beside them stays
        with new_file(stage / WEIGHTS_NAMES[0]) as f:
            write_safetensors(f, Entries(list(tensors.items())), file_metadata({}, {}))
        (stage / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    notes = []
    if skipped:
        notes.append(f"{len(skipped)} tensor(s) differ but are not in the adapter (see skipped), e.g. "
                     + ", ".join(list(skipped)[:3]))
    return LoraReport(str(folder), "peft", [str(folder / WEIGHTS_NAMES[0]), str(folder / CONFIG_NAME)], modules,
                      len(tensors), error=worst, notes=notes, skipped=skipped)
