"""Remake docs/report-screenshot.png (the README's picture) from reports/saliency-shortcut/report.html.

    python docs/make_screenshot.py          # needs chromium (headless) and Pillow

A tall headless-Chromium screenshot of the report, two crops stacked (the header with the checks, and the card of
00_triangle_marker.png: input, gradient and IG maps, overlays, tables), scaled to 80% and reduced to 256 colours
(about 100 KB). The crop boxes fit the report's current layout at a 1300 px wide window: look at the result.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "reports/saliency-shortcut/report.html"
OUT = ROOT / "docs/report-screenshot.png"
HEADER = (85, 10, 1215, 266)     # title, status, checks summary, the first check
CARD = (85, 2440, 1215, 3195)    # "2. 00_triangle_marker.png"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "tall.png"
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1300,5000", f"--screenshot={shot}", REPORT.as_uri()],
                       check=True, capture_output=True, timeout=120)
        im = Image.open(shot).convert("RGB")
    top, card = im.crop(HEADER), im.crop(CARD)
    page = Image.new("RGB", (top.width, top.height + 10 + card.height), im.getpixel((20, 20)))
    page.paste(top, (0, 0))
    page.paste(card, (0, top.height + 10))
    page = page.resize((int(page.width * 0.8), int(page.height * 0.8)), Image.LANCZOS)
    page = page.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    page.save(OUT, optimize=True)
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size // 1024} KB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
