"""`report`: one self-contained HTML page with health, statistics, histograms and changes."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import weightsmith
import weightsmith.html_report as report_module
from weightsmith.errors import UsageError, WeightsmithError
from weightsmith.html_report import SCHEMA, report

pytest.importorskip("plotly")


def page_data(path: Path) -> dict:
    """The JSON the page embeds next to its plots."""
    text = path.read_text(encoding="utf-8")
    m = re.search(r'<script id="ws-data" type="application/json">(.*?)</script>', text, re.S)
    assert m, "the page embeds its data"
    return json.loads(m.group(1))


def external_references(text: str) -> list[str]:
    """Every script, stylesheet, image or frame the page would fetch from elsewhere."""
    return re.findall(r"<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)\s*=[^>]*>", text,
                      re.I)


@pytest.fixture
def mlp_file(tmp_path: Path, mlp: nn.Module) -> Path:
    path = tmp_path / "mlp.safetensors"
    weightsmith.save(mlp, path)
    return path


@pytest.fixture
def broken_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    weight = torch.randn(8, 4)
    weight[2, 3] = float("nan")
    weight[0, 0] = float("inf")
    path = tmp_path / "broken.safetensors"
    save_file({"0.weight": weight, "0.bias": torch.zeros(8), "2.weight": torch.randn(1, 8) * 1e5,
               "2.bias": torch.randn(1)}, str(path))
    return path


@pytest.mark.parametrize("compared", [False, True])
def test_page_is_one_self_contained_file(tmp_path, mlp_file, compared):
    out = report(mlp_file, tmp_path / "r.html", compare=mlp_file if compared else None)
    text = out.read_text(encoding="utf-8")
    assert out == tmp_path / "r.html" and text.startswith("<!DOCTYPE html>")
    assert external_references(text) == []
    assert "default-src 'none'" in text  # the browser itself refuses any fetch
    assert text.count("* plotly.js v") == 1  # the library is inlined, once
    figures = 1 + 4 + compared  # heatmap, one histogram per tensor, the change per layer
    assert text.count("Plotly.newPlot(") == figures
    assert sorted(re.findall(r'id="(ws-fig-\d+)"', text)) == sorted(
        f"ws-fig-{i}" for i in range(1, figures + 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.safetensors", "r.html"]


def test_header_table_and_data_describe_the_checkpoint(tmp_path, mlp_file, mlp):
    out = report(mlp_file, tmp_path / "r.html")
    text = out.read_text(encoding="utf-8")
    data = page_data(out)
    assert data["schema"] == SCHEMA and data["ok"] is True
    assert (data["format"], data["tensors"], data["parameters"]) == ("safetensors", 4, 49)
    assert '<div class="verdict ok">healthy</div>' in text
    assert "<b>49</b>" in text and "<b>safetensors</b>" in text
    stats = {s["key"]: s for s in data["stats"]}
    w = mlp[0].weight.detach().double()
    assert stats["0.weight"]["mean"] == pytest.approx(w.mean().item(), rel=1e-6)
    assert stats["0.weight"]["std"] == pytest.approx(w.std(unbiased=False).item(), rel=1e-6)
    for key in ("0.weight", "0.bias", "2.weight", "2.bias"):
        assert f'<td class="name">{key}</td>' in text
    # the table sorts on the real values
    row = re.search(r'<td class="name">2\.bias</td>.*?</tr>', text).group(0)
    shape, params, mean = re.findall(r'data-v="([^"]+)"', row)[:3]
    assert (shape, params) == ("1", "1.0") and float(mean) == pytest.approx(mlp[2].bias.item())


def test_histograms_count_the_finite_values(tmp_path, broken_file):
    data = page_data(report(broken_file, tmp_path / "r.html", bins=10))
    values = load_file(str(broken_file))["0.weight"].flatten().numpy()
    finite = values[np.isfinite(values)]
    h = data["histograms"]["0.weight"]
    expected, _ = np.histogram(finite, bins=10, range=(finite.min(), finite.max()))
    assert h["counts"] == expected.tolist() and sum(h["counts"]) == 30
    assert (h["lo"], h["hi"]) == (float(finite.min()), float(finite.max()))
    zeros = data["histograms"]["0.bias"]  # constant: one bar, every value in it
    assert sum(zeros["counts"]) == 8 and max(zeros["counts"]) == 8 and zeros["lo"] < 0 < zeros["hi"]


def test_histograms_and_changes_do_not_depend_on_chunking(tmp_path, monkeypatch):
    torch.manual_seed(0)
    a = {"w": torch.randn(50, 7), "v": torch.randn(33, dtype=torch.float64)}
    b = {k: v + 0.01 * torch.randn_like(v) for k, v in a.items()}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    whole = page_data(report(tmp_path / "b.safetensors", tmp_path / "1.html",
                             compare=tmp_path / "a.safetensors"))
    monkeypatch.setattr(report_module, "HIST_CHUNK", 7)
    monkeypatch.setattr(report_module, "DIFF_CHUNK", 5)
    chunked = page_data(report(tmp_path / "b.safetensors", tmp_path / "2.html",
                               compare=tmp_path / "a.safetensors"))
    assert chunked["histograms"] == whole["histograms"]
    for c1, c2 in zip(whole["compare"]["changes"], chunked["compare"]["changes"]):
        assert c1["rel_l2"] == pytest.approx(c2["rel_l2"], rel=1e-12)
        assert c1["max_abs"] == c2["max_abs"]


def test_findings_are_named_and_highlighted(tmp_path, broken_file):
    out = report(broken_file, tmp_path / "r.html")
    text, data = out.read_text(encoding="utf-8"), page_data(out)
    assert data["ok"] is False
    assert [(f["key"], f["kind"]) for f in data["findings"]] == [  # in file order
        ("0.bias", "all_zero"), ("0.weight", "nan"), ("0.weight", "inf"), ("2.weight", "exploding")]
    assert '<div class="verdict bad">3 errors in 2 tensors (1 warning)</div>' in text
    assert '<tr class="bad"><td class="name">0.weight</td>' in text
    assert '<tr class="warn"><td class="name">0.bias</td>' in text
    assert "1 of 32 values are NaN" in text
    health = re.search(r'<section id="health">.*?</section>', text, re.S).group(0)
    assert "2.bias" not in health  # a healthy tensor is not listed


def test_histograms_are_capped_to_the_largest_plus_findings(tmp_path):
    torch.manual_seed(0)
    sd = {f"layers.{i}.weight": torch.randn(i + 2, 4) for i in range(10)}
    sd["layers.0.weight"][0, 0] = float("nan")  # the smallest tensor, but broken
    save_file(sd, str(tmp_path / "m.safetensors"))
    out = report(tmp_path / "m.safetensors", tmp_path / "r.html", max_histograms=3)
    data, text = page_data(out), out.read_text(encoding="utf-8")
    assert sorted(data["histograms"]) == ["layers.0.weight", "layers.7.weight", "layers.8.weight",
                                          "layers.9.weight"]
    assert "Showing 4 of 10 tensors: the 3 largest and 1 more with findings" in text
    table = re.search(r'<section id="parameters">.*?</section>', text, re.S).group(0)
    assert len(data["stats"]) == 10 and table.count('<td class="name">layers.') == 10
    off = page_data(report(tmp_path / "m.safetensors", tmp_path / "off.html", max_histograms=0))
    assert off["histograms"] == {} and len(off["stats"]) == 10


def test_compare_measures_relative_l2_change_per_tensor_and_layer(tmp_path, mlp):
    base = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
    tuned = {k: v.clone() for k, v in base.items()}
    delta = torch.full_like(base["2.weight"], 0.25)
    tuned["2.weight"] += delta
    tuned["2.bias"] += 1.0
    tuned["head.weight"] = torch.ones(3)  # a new head
    base["0.bias"] = torch.zeros(9)  # reshaped in the fine-tuned model
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    out = report(tmp_path / "tuned.safetensors", tmp_path / "r.html",
                 compare=tmp_path / "base.safetensors")
    c = page_data(out)["compare"]
    changes = {ch["key"]: ch for ch in c["changes"]}
    assert set(changes) == {"0.weight", "2.weight", "2.bias"}
    assert changes["0.weight"]["rel_l2"] == 0.0 and changes["0.weight"]["max_abs"] == 0.0
    moved = tuned["2.weight"].double() - base["2.weight"].double()  # delta as float32 holds it
    expected = (moved.norm() / base["2.weight"].double().norm()).item()
    assert changes["2.weight"]["rel_l2"] == pytest.approx(expected, rel=1e-12)
    assert changes["2.weight"]["max_abs"] == moved.abs().max().item()
    assert expected == pytest.approx((delta.norm() / base["2.weight"].norm()).item(), rel=1e-6)
    assert changes["2.bias"]["rel_l2"] == pytest.approx(1.0 / abs(base["2.bias"].item()), rel=1e-6)
    layers = {row["layer"]: row for row in c["layers"]}
    ref = base["2.weight"].double().pow(2).sum().item() + base["2.bias"].item() ** 2
    rolled = math.sqrt(0.25**2 * 8 + 1.0) / math.sqrt(ref)
    assert layers["2"]["rel_l2"] == pytest.approx(rolled, rel=1e-6)
    assert sorted(layers["2"]["tensors"]) == ["2.bias", "2.weight"]
    assert layers["0"]["rel_l2"] == 0.0
    assert c["only_here"] == ["head.weight"] and c["only_there"] == []
    assert c["not_compared"] == {"0.bias": "shape (8,) here, (9,) in the reference"}
    text = out.read_text(encoding="utf-8")
    assert "Relative L2 change per layer" in text and "rel. change" in text
    assert "Relative L2 change by depth" not in text  # two blocks only: no depth grid


def test_compare_draws_change_by_depth_for_repeated_blocks(tmp_path):
    torch.manual_seed(0)
    base = {f"blocks.{i}.{part}.weight": torch.randn(4, 4) for i in range(4)
            for part in ("attn", "mlp")}
    tuned = {k: v + (0.5 if k == "blocks.3.mlp.weight" else 0.0) for k, v in base.items()}
    save_file(base, str(tmp_path / "a.safetensors"))
    save_file(tuned, str(tmp_path / "b.safetensors"))
    out = report(tmp_path / "b.safetensors", tmp_path / "r.html",
                 compare=tmp_path / "a.safetensors")
    text = out.read_text(encoding="utf-8")
    assert "Relative L2 change by depth" in text
    grid = report_module._depth_grid(report_module._layers(
        [report_module._Change(k, 0.0, 0.0, 0.0, 1.0) for k in base]))
    assert grid[0] == ["blocks.#.attn", "blocks.#.mlp"] and grid[1] == [0, 1, 2, 3]
    moved = [row["layer"] for row in page_data(out)["compare"]["layers"] if row["rel_l2"] > 0]
    assert moved == ["blocks.3.mlp"]


def test_tied_tensors_are_measured_once_and_listed_under_each_name(tmp_path, tied_mlp):
    path = tmp_path / "tied.safetensors"
    weightsmith.save(tied_mlp, path)
    assert weightsmith.open(path).ties == [("1.weight", "3.weight"), ("1.bias", "3.bias")]
    out = report(path, tmp_path / "r.html")
    data, text = page_data(out), out.read_text(encoding="utf-8")
    assert data["aliases"] == {"3.weight": "1.weight", "3.bias": "1.bias"}
    assert [s["key"] for s in data["stats"]] == ["0.weight", "0.bias", "1.weight", "1.bias",
                                                 "4.weight", "4.bias"]
    assert '3.weight <span class="tied">= 1.weight</span>' in text
    assert data["parameters"] == 40 + 72 + 9  # the shared layer once


def test_rows_follow_natural_layer_order(tmp_path):
    sd = {name: torch.randn(2) for name in ("layers.10.w", "layers.2.w", "layers.1.w", "embed")}
    save_file(sd, str(tmp_path / "m.safetensors"))
    out = report(tmp_path / "m.safetensors", tmp_path / "r.html")
    assert page_data(out)["order"] == ["embed", "layers.1.w", "layers.2.w", "layers.10.w"]
    text = out.read_text(encoding="utf-8")
    table = [m for m in re.findall(r'<td class="name">([^<]+)</td>', text)]
    assert table == ["embed", "layers.1.w", "layers.2.w", "layers.10.w"]


def test_progress_counts_bytes_up_to_the_total(tmp_path, mlp_file):
    calls = []
    report(mlp_file, tmp_path / "r.html", compare=mlp_file,
           progress=lambda done, total, key: calls.append((done, total, key)))
    dones = [d for d, _, _ in calls]
    assert dones == sorted(dones) and calls[-1][0] == calls[-1][1] == 2 * 49 * 4
    assert {k for _, _, k in calls} == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_select_narrows_both_checkpoints(tmp_path, mlp_file):
    out = report(mlp_file, tmp_path / "r.html", compare=mlp_file, select="0.*")
    data = page_data(out)
    assert [s["key"] for s in data["stats"]] == ["0.weight", "0.bias"]
    assert [c["key"] for c in data["compare"]["changes"]] == ["0.weight", "0.bias"]
    assert data["compare"]["only_there"] == []
    with pytest.raises(weightsmith.SelectorError, match="matched nothing"):
        report(mlp_file, tmp_path / "x.html", select="decoder.*")


def test_other_dtypes_get_statistics_and_histograms(tmp_path):
    torch.manual_seed(0)
    sd = {"bf16": torch.randn(40).bfloat16(), "half": torch.randn(30).half(),
          "f64": torch.randn(20, dtype=torch.float64), "steps": torch.arange(12),
          "mask": torch.tensor([True, False, True])}
    save_file(sd, str(tmp_path / "m.safetensors"))
    out = report(tmp_path / "m.safetensors", tmp_path / "r.html")
    data = page_data(out)
    assert "Integer and bool tensors (2) are left out" in out.read_text(encoding="utf-8")
    assert {k: sum(h["counts"]) for k, h in data["histograms"].items()} == {
        "bf16": 40, "half": 30, "f64": 20, "steps": 12, "mask": 3}
    steps = data["histograms"]["steps"]
    assert (steps["lo"], steps["hi"]) == (0.0, 11.0)
    assert data["ok"] is True  # integer tensors are measured, not judged


def test_bad_arguments_are_listed_at_once_and_nothing_is_written(tmp_path, mlp_file):
    with pytest.raises(UsageError) as e:
        report(mlp_file, tmp_path / "missing" / "r.html", bins=1, max_histograms=-1, progress=3)
    msg = str(e.value)
    assert "does not exist" in msg and "bins must be" in msg and "max_histograms must be" in msg
    assert "progress must be callable" in msg
    with pytest.raises(UsageError, match="is a folder"):
        report(mlp_file, tmp_path)
    with pytest.raises(UsageError, match="src must be a checkpoint path"):
        report({"w": torch.ones(1)}, tmp_path / "r.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.safetensors"]
    with pytest.raises(weightsmith.CheckpointNotFoundError):
        report(tmp_path / "nope.safetensors", tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_missing_plotly_names_the_extra_to_install(tmp_path, mlp_file, monkeypatch):
    for name in ("plotly", "plotly.graph_objects", "plotly.io"):
        monkeypatch.setitem(sys.modules, name, None)  # import now raises ImportError
    with pytest.raises(WeightsmithError, match=re.escape("pip install weightsmith[report]")):
        report(mlp_file, tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_opened_checkpoint_is_used_and_left_open(tmp_path, mlp_file):
    ckpt = weightsmith.open(mlp_file)
    report(ckpt, tmp_path / "r.html")
    assert ckpt.tensor("0.weight").shape == (8, 4)  # still readable


def test_existing_file_is_replaced_without_leftovers(tmp_path, mlp_file):
    out = tmp_path / "r.html"
    out.write_text("old")
    report(mlp_file, out)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.safetensors", "r.html"]


def test_names_cannot_inject_markup(tmp_path):
    key = 'evil</script><img src=x onerror="alert(1)">.weight'
    save_file({key: torch.randn(3)}, str(tmp_path / "m.safetensors"))
    out = report(tmp_path / "m.safetensors", tmp_path / "r.html")
    text = out.read_text(encoding="utf-8")
    assert "<img src=x" not in text and "</script><img" not in text
    assert external_references(text) == []
    assert [s["key"] for s in page_data(out)["stats"]] == [key]


def _llama_like_page(layers: int = 32, hidden: int = 4096, mlp: int = 11008, vocab: int = 32000):
    """The page of a 7B-parameter LLaMA-like checkpoint: its key list and shapes taken from
    meta tensors (nothing allocated), its statistics and histograms synthetic."""
    import random

    from weightsmith.io._base import TensorInfo
    from weightsmith.listing import list_checkpoint
    from weightsmith.tensor_stats import StatsReport, TensorStats

    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.{n}_proj.weight": (hidden, hidden) for n in "qkvo"})
        shapes.update({f"{p}.mlp.gate_proj.weight": (mlp, hidden), f"{p}.mlp.up_proj.weight": (mlp, hidden),
                       f"{p}.mlp.down_proj.weight": (hidden, mlp), f"{p}.input_layernorm.weight": (hidden,),
                       f"{p}.post_attention_layernorm.weight": (hidden,)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    metas = {k: torch.empty(s, dtype=torch.bfloat16, device="meta") for k, s in shapes.items()}
    infos = {k: TensorInfo(k, tuple(t.shape), "bfloat16", t.numel() * t.element_size()) for k, t in metas.items()}
    listing = list_checkpoint(infos)
    rng = random.Random(0)
    stats = [TensorStats(k, "bfloat16", tuple(t.shape), t.numel(), rng.gauss(0, 1e-3), rng.uniform(0.01, 0.05),
                         -0.5, 0.5, rng.uniform(0.1, 1.0), 1.0, 0.0, 0, 0) for k, t in metas.items()]
    measured = StatsReport("llama-7b.safetensors", stats)
    largest = set(sorted(shapes, key=lambda k: -metas[k].numel())[:report_module.MAX_HISTOGRAMS])
    histograms = {k: report_module._Histogram(-0.5, 0.5, [rng.randrange(10**6) for _ in range(report_module.BINS)])
                  for k in largest}
    order = sorted(shapes, key=report_module._natural)
    page = report_module._Page(listing, measured, weightsmith.check(measured), histograms, largest,
                               report_module.MAX_HISTOGRAMS, None, order)
    return page, sum(t.numel() for t in metas.values())


def test_a_7b_page_rolls_the_heatmap_up_by_block_and_stays_under_a_megabyte():
    import plotly.offline

    page, params = _llama_like_page()
    assert 6.5e9 < params < 7e9 and len(page.order) == 291
    text = report_module._render(page, report_module._plotly())
    own = len(text.encode()) - len(plotly.offline.get_plotlyjs().encode())
    assert own < 1_000_000, own
    heat = re.search(r'<section id="heatmap">.*?</section>', text, re.S).group(0)
    blocks = ["lm_head", "model.embed_tokens", *(f"model.layers.{i}" for i in range(32)), "model.norm"]
    assert json.dumps(blocks).replace(" ", "") in heat.replace(" ", "")  # 35 rows, natural order, not 291
    assert 'data-drill="ws-fig-1"' in heat
    assert text.count('data-block="model.layers.7"') == 9  # the drill-down finds a block's 9 rows


DRILL_HARNESS = r"""
function el(attrs) { return {hidden: false, attrs: attrs || {}, getAttribute(k) { return k in this.attrs ? this.attrs[k] : null; }}; }
const rows = [el({'data-block': 'layers.0'}), el({'data-block': 'layers.1'}), el({'data-block': 'layers.1'})];
const span = {textContent: ''}, button = {listeners: {}, addEventListener(t, f) { this.listeners[t] = f; }};
const bar = Object.assign(el(), {hidden: true, querySelector(s) { return s === 'span' ? span : button; }, scrollIntoView() {}});
const card = el({'data-drill': 'ws-fig-1'});
const fig = {handlers: {}, on(t, f) { this.handlers[t] = f; }};
global.document = {
  getElementById(id) { return id === 'ws-drill' ? bar : id === 'ws-fig-1' ? fig : null; },
  querySelector(s) { return s === '[data-drill]' ? card : null; },
  querySelectorAll(s) { return rows; },
};
global.setTimeout = (f) => f();
eval(SCRIPT);
fig.handlers.plotly_click({points: [{y: 'layers.1'}]});
console.log(rows.map(r => r.hidden).join(','), bar.hidden, span.textContent);
button.listeners.click();
console.log(rows.map(r => r.hidden).join(','), bar.hidden);
"""


def test_clicking_a_block_lists_its_tensors(tmp_path):
    """The drill-down script, run by node against a stand-in for the page's elements."""
    import shutil
    import subprocess

    from weightsmith._report_assets import DRILL_SCRIPT

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH")
    script = tmp_path / "drill.js"
    script.write_text(DRILL_HARNESS.replace("SCRIPT", json.dumps(DRILL_SCRIPT)))
    out = subprocess.run([node, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["true,false,false false Showing the 2 tensor(s) of block layers.1.",
                                       "false,false,false true"]
