"""OUT/report.html in a real headless Chromium: it renders, shows every image, keeps user text as text (escaped
markup, unicode intact), sorts by a scorer's difference, and needs nothing from outside OUT."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation import compare, score
from evaluation.layout import REPORT_FILE, ScoreRecord, publish_scores, read_images
from tests.fixtures.browser import Browser
from tests.fixtures.eval_folders import PAIRS, PROMPTS

# every image scrolled into view (they load lazily) and decoded; then their sources and natural widths
LOAD_IMAGES = """(async () => {
  const images = Array.from(document.images);
  for (const img of images) { img.scrollIntoView(); await img.decode().catch(() => null); }
  window.scrollTo(0, 0);
  return images.map(img => [img.getAttribute('src'), img.naturalWidth]);
})()"""
ROW_DIFFS = (
    "Array.from(document.querySelectorAll('#pairs > tbody > tr')).map(r => Number(r.dataset['diff-0']))"
)


@pytest.fixture
def report(eval_folder: Path) -> Path:
    """The eval folder scored by the rule and by a second, hand-made scorer, then compared."""
    assert score.main(["--images", str(eval_folder), "--scorer", "rule"]) == 0
    fake = [
        ScoreRecord(model, pid, seed, "pickscore", "v1", float(i if model == "tuned" else -i), "w")
        for i, (pid, seed) in enumerate(PAIRS)
        for model in ("base", "tuned")
    ]
    publish_scores(eval_folder, fake)
    assert compare.main(["--images", str(eval_folder), "--a", "base", "--b", "tuned"]) == 0
    return eval_folder / REPORT_FILE


def test_the_page_is_self_contained(report: Path) -> None:
    html = report.read_text(encoding="utf-8")
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", html)  # nothing from the network, no CDN
    sources = re.findall(r'<img[^>]* src="([^"]+)"', html)
    assert sorted(sources) == sorted(
        r.path for r in read_images(report.parent)
    )  # every image, by relative path
    assert html.count("<script>") == 1  # the page's own sorting script; prompts only as escaped text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html and "café ☕ 日本語" in html


def test_the_page_renders_in_chromium(report: Path, browser: Browser) -> None:
    browser.open(report)
    loaded = browser.evaluate(LOAD_IMAGES)
    assert len(loaded) == 2 * len(PAIRS)
    assert all(width > 0 for _, width in loaded), [src for src, width in loaded if width == 0]

    text = browser.evaluate("document.body.innerText")
    assert PROMPTS[1][0] in text  # '<script>alert("x")</script> & <b>bold</b>' shown as the characters typed
    assert PROMPTS[2][0] in text  # café ☕ 日本語
    assert "<i>user</i> text ✓" in browser.evaluate("document.querySelector('details').textContent")
    assert browser.evaluate("document.scripts.length") == 1
    assert browser.evaluate("document.querySelectorAll('.prompt b, .prompt script').length") == 0
    assert "0.812" in text  # the rule's win rate in the summary table

    # sort by the first scorer's b − a (pickscore, listed before rule): largest first, then the other way round
    browser.evaluate(
        "(() => { const s = document.getElementById('sort-key'); s.value = 'diff-0';"
        " s.dispatchEvent(new Event('change')); })()"
    )
    diffs = browser.evaluate(ROW_DIFFS)
    assert diffs == sorted(diffs, reverse=True) and len(set(diffs)) == len(PAIRS)
    browser.evaluate("document.getElementById('sort-dir').click()")
    assert browser.evaluate(ROW_DIFFS) == sorted(diffs)

    shot = np.asarray(Image.open(io.BytesIO(browser.screenshot())).convert("RGB"), dtype=np.float32)
    assert shot.shape[0] > 1000 and shot.shape[1] >= 1000
    assert shot.std() > 20  # not a blank page
    colours = {tuple(c) for c in shot[::4, ::4].reshape(-1, 3).astype(int)}
    assert len(colours) > 50  # text and images, not a flat fill
