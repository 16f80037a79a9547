"""The HTML report in headless Chromium: no console errors, no page-initiated network requests, not blank,
and a model label containing <script> shows as text. Skipped when chromium is not installed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import pytest

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


def _browse(html_path: str, tmp: str) -> tuple[str, list[str], str]:
    """Screenshot a page; returns (stderr, page-initiated non-local request URLs, screenshot path)."""
    shot = os.path.join(tmp, "shot.png")
    netlog = os.path.join(tmp, "net.json")
    profile = tempfile.mkdtemp(dir=tmp)
    p = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                        f"--log-net-log={netlog}", "--window-size=1100,900", f"--screenshot={shot}",
                        "file://" + os.path.abspath(html_path)], capture_output=True, text=True, timeout=90)
    urls = []
    with open(netlog) as f:
        log = json.load(f)
    for e in log.get("events", []):
        prm = e.get("params") or {}
        # requests made by the page carry its (opaque, "null") origin; the browser's own have "not an origin"
        if "url" in prm and "initiator" in prm and prm["initiator"] != "not an origin":
            if not prm["url"].startswith(("file:", "data:")):
                urls.append(prm["url"])
    return p.stderr, urls, shot


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line
            or "Refused to" in line]


def _not_blank(path: str) -> bool:
    from PIL import Image, ImageStat

    img = Image.open(path).convert("L")
    st = ImageStat.Stat(img)
    return st.stddev[0] > 5 and len(set(img.getdata())) > 10


def test_detector_catches_a_bad_page(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="http://example.invalid/x.png"><script>console.error("boom")</script>'
                   "</body></html>")
    stderr, urls, _ = _browse(str(bad), str(tmp_path))
    assert _console_lines(stderr) and urls == ["http://example.invalid/x.png"] * len(urls) and urls


def test_report_in_chromium(tmp_path):
    from jacaudit.report import render
    from tests.test_results import EVIL, example_report

    page = tmp_path / "report.html"
    page.write_bytes(render(example_report(), "html"))
    stderr, urls, shot = _browse(str(page), str(tmp_path))
    assert not _console_lines(stderr), _console_lines(stderr)
    assert urls == []
    assert os.path.getsize(shot) > 0 and _not_blank(shot)
    # the <script> label is text: it is in the page escaped, and no script element exists
    html = page.read_text()
    assert EVIL not in html and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html


def _png_size(path: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size


@pytest.mark.parametrize("kind", ["saliency", "jacobian", "verify", "inspect"])
def test_each_report_kind_in_chromium(kind, tmp_path):
    """Every report kind (built from the example reports, with checks of each status and the new result fields)
    renders in Chromium without console errors or network, and its screenshot is not blank."""
    from jacaudit.report import render
    from tests.test_html import kind_reports

    rep = kind_reports()[kind]
    page = tmp_path / f"{kind}.html"
    page.write_bytes(render(rep, "html"))
    stderr, urls, shot = _browse(str(page), str(tmp_path))
    assert not _console_lines(stderr), _console_lines(stderr)
    assert urls == []
    final = tmp_path / f"{kind}.png"
    os.replace(shot, final)
    w, h = _png_size(str(final))
    assert (w, h) == (1100, 900)
    assert os.path.getsize(final) > 10_000 and _not_blank(str(final))
    keep = os.environ.get("JACAUDIT_SHOTS")  # a folder to copy the screenshots to, for a person to look at
    if keep:
        os.makedirs(keep, exist_ok=True)
        shutil.copy(final, os.path.join(keep, f"{kind}.png"))
