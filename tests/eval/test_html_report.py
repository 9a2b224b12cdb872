"""The HTML report: self-contained (every image a data: URI that decodes), t2i tiles cut from the
grid exactly with the judge's verdict under each, one curve point per step after a resume, and
one clear error for a missing run folder."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from pretzel_jax.eval import report
from pretzel_jax.eval.pretzel_report import _grid_png


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.captions, self.polylines, self._cap = [], [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "polyline":
            self.polylines.append(attrs["points"].split())
        self._cap = tag == "figcaption"

    def handle_data(self, data):
        if self._cap:
            self.captions.append(data)
            self._cap = False


def _decode(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def _run_folder(tmp_path):
    """A run folder with a t2i grid, its report, training curves and another PNG."""
    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(0)
    cats = ["single_object"] * 3 + ["counting"] * 3
    tiles = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    _grid_png(tiles, run / "t2i_test.png", cols=3)
    verdicts = [True, False, True, False, False, True]
    rep = {
        "t2i_single_object": 2 / 3,
        "t2i_counting": 1 / 3,
        "t2i_test_prompts": [f"prompt {i}" for i in range(6)],
        "t2i_test_categories": cats,
        "t2i_test_verdicts": verdicts,
        "vqa_examples": {"fae": [{"question": "q?", "answer": "a", "truth": "b", "objects": 1}]},
    }
    (run / "report.json").write_text(json.dumps(rep))
    (run / "tasks.json").write_text(json.dumps({"edit_success": 0.375}))
    rows = [{"step": s, "loss": 1.0 / s} for s in (10, 20, 30)] + [{"step": 20, "loss": 0.7}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Image.fromarray(tiles[0]).save(run / "other.png")
    return run, tiles, verdicts


def test_report_page(tmp_path):
    run, tiles, verdicts = _run_folder(tmp_path)
    page = _Page()
    text = report.build([run])
    assert "<td>edit_success</td><td>0.375</td>" in text  # tasks.json beside report.json
    page.feed(text)
    decoded = [_decode(uri) for uri in page.images]  # every image inline and readable
    np.testing.assert_array_equal(np.stack(decoded[:6]), tiles)  # cut from the grid exactly
    assert len(decoded) == 7  # the six tiles, then the other PNG
    assert page.captions[:6] == [
        f"prompt {i}" + (" ✓" if v else " ✗") for i, v in enumerate(verdicts)
    ]
    assert len(page.polylines) == 1 and len(page.polylines[0]) == 3  # steps 10, 20, 30 once
    with pytest.raises(SystemExit, match="no run folder"):
        report.main(["--run", str(tmp_path / "missing"), "--out", str(tmp_path / "x.html")])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless, and quiet on a closed network (no background connections).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=10000",
]
# After load: how many images decoded, and the laid-out page's height.
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const height = document.body.scrollHeight;
  document.body.setAttribute('data-probe', ok + '/' + imgs.length + '/' + height);
});</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium)")
def test_report_renders_in_a_headless_browser(tmp_path):
    run, tiles, _ = _run_folder(tmp_path)
    html = report.build([run])
    probed = tmp_path / "probe.html"
    probed.write_text(html.replace("</body>", PROBE))
    argv = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [*argv, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    found = re.search(r'data-probe="(\d+)/(\d+)/(\d+)"', dom)
    assert found, dom[-2000:]
    loaded, total, height = map(int, found.groups())
    assert total == 7 and loaded == total  # every image decoded in the browser
    assert height > 4 * 32  # laid out, not an empty page
    shot = tmp_path / "page.png"
    page = tmp_path / "page.html"
    page.write_text(html)
    subprocess.run(
        [*argv, f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.reshape(-1, 3).std(0).max() > 5  # something was drawn
