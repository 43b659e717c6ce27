"""The report in a real browser: headless Chromium draws every plot, with no error, no fetch."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from weightsmith.html_report import report

pytest.importorskip("plotly")
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not on PATH (.ci/run installs Debian's), so the report "
    "cannot be opened in a real browser")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--virtual-time-budget=10000"]

# an error, a console.error and a fetch the page's policy must block: the collector sees all three
BROKEN = ('<script>window.wsMissing();</script><script>console.error("boom");</script>'
          '<img src="https://example.invalid/pixel.png">')


def start(url: str, profile: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *extra, url],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> SimpleNamespace:
    """Two reports (plain, and compared with a base) and a sabotaged copy, each opened in
    Chromium at once: DOMs after the scripts ran, and a screenshot of the compared one."""
    tmp = tmp_path_factory.mktemp("browser")
    torch.manual_seed(0)
    base = {f"layers.{i}.{part}": torch.randn(16, 8) * 0.1 for i in range(4)
            for part in ("attn.weight", "mlp.weight")}
    base["embed.weight"] = torch.randn(64, 8)
    tuned = {k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}
    tuned["layers.2.mlp.weight"][0, 0] = float("nan")
    save_file(base, str(tmp / "base.safetensors"))
    save_file(tuned, str(tmp / "tuned.safetensors"))
    pages = {"plain": report(tmp / "tuned.safetensors", tmp / "plain.html"),
             "compared": report(tmp / "tuned.safetensors", tmp / "compared.html",
                                compare=tmp / "base.safetensors")}
    broken = tmp / "broken.html"
    broken.write_text(pages["plain"].read_text(encoding="utf-8").replace("</body>",
                                                                          BROKEN + "</body>"))
    pages["broken"] = broken
    shot = tmp / "shot.png"
    runs = {name: start(path.as_uri(), tmp / f"profile-{name}", "--dump-dom")
            for name, path in pages.items()}
    runs["shot"] = start(pages["compared"].as_uri(), tmp / "profile-shot",
                         f"--screenshot={shot}", "--window-size=1400,2000")
    doms = {}
    for name, proc in runs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"chromium failed on {name}"
        doms[name] = out
    return SimpleNamespace(pages=pages, doms=doms, shot=shot)


def errors_in(dom: str) -> str:
    m = re.search(r'<pre id="ws-errors"[^>]*>(.*?)</pre>', dom, re.S)
    assert m, "the page keeps its error collector"
    return m.group(1)


@pytest.mark.parametrize("name", ["plain", "compared"])
def test_every_plot_renders_without_errors(browser, name):
    dom, source = browser.doms[name], browser.pages[name].read_text(encoding="utf-8")
    assert errors_in(dom) == ""
    figures = source.count("Plotly.newPlot(")
    assert figures == (1 + 9 + (2 if name == "compared" else 0))  # heatmap, histograms, changes
    # plotly.js marks a div js-plotly-plot and draws its main-svg only once it has run
    assert len(re.findall(r'class="[^"]*\bjs-plotly-plot\b', dom)) == figures
    assert dom.count('class="main-svg"') >= 2 * figures
    # the blocks are drawn as the heatmap's row labels, top to bottom in natural layer order
    labels = re.findall(r'<g class="ytick"><text[^>]*data-unformatted="(embed|layers\.\d+)"[^>]*'
                        r'transform="translate\(0,([-\d.]+)\)"', dom)
    top_down = [name for name, y in sorted(labels, key=lambda pair: float(pair[1]))]
    if name == "plain":  # the only figure with such labels there
        assert top_down == ["embed"] + [f"layers.{i}" for i in range(4)]
    if name == "compared":
        assert 'data-unformatted="layers.#.mlp"' in dom  # the change-by-depth grid


@pytest.mark.parametrize("name", ["plain", "compared"])
def test_rendered_page_references_nothing_outside(browser, name):
    dom = browser.doms[name]
    assert not re.findall(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=\"?(?:https?:)?//",
                          dom, re.I)
    assert "blocked:" not in errors_in(dom)


def test_error_collector_sees_errors_and_blocked_fetches(browser):
    errors = errors_in(browser.doms["broken"])
    assert "wsMissing" in errors
    assert "console.error: boom" in errors
    assert "blocked: img-src https://example.invalid/pixel.png" in errors


def test_screenshot_shows_the_page(browser):
    pixels = read_png(browser.shot)
    assert pixels.shape == (2000, 1400, 3)
    colors = count_colors(pixels)
    assert len(colors) > 500  # text, plots and colour scales, not a blank page
    assert max(colors.values()) < 0.8 * 1400 * 2000
    assert colors[0xCF222E] > 200  # the red verdict and finding badges
    assert colors[0x3B6EA8] > 2000  # the bars of the change plot


def count_colors(pixels: np.ndarray) -> Counter[int]:
    """Pixels per colour, colours as 0xRRGGBB."""
    p = pixels.astype(np.uint32)
    values, counts = np.unique((p[..., 0] << 16) | (p[..., 1] << 8) | p[..., 2], return_counts=True)
    return Counter(dict(zip(values.tolist(), counts.tolist())))


def read_png(path: Path) -> np.ndarray:
    """Pixels of an 8-bit RGB or RGBA PNG as an (h, w, 3) array; no imaging library needed.

    Rows are unfiltered along anti-diagonals: a pixel depends only on its left, upper and
    upper-left neighbours, so every pixel of one anti-diagonal can be done at once.
    """
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, "an 8-bit RGB(A) PNG"
        elif kind == b"IDAT":
            idat += body
    channels = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * channels)
    kinds = raw[:, 0].astype(np.int16)
    filtered = raw[:, 1:].reshape(height, width, channels).astype(np.int16)
    out = np.zeros((height + 1, width + 1, channels), np.int16)  # a zero row and column before
    zero = np.zeros((1, channels), np.int16)
    for k in range(height + width - 1):
        r = np.arange(max(0, k - width + 1), min(height - 1, k) + 1)
        x = k - r
        left, up, corner = out[r + 1, x], out[r, x + 1], out[r, x]
        p = left + up - corner
        pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, corner))
        which = np.broadcast_to(kinds[r][:, None], left.shape)
        guess = np.choose(which, [zero + 0 * left, left, up, (left + up) // 2, paeth])
        out[r + 1, x + 1] = (filtered[r, x] + guess) & 255
    return out[1:, 1:, :3].astype(np.uint8)
