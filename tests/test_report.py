"""Renderers: HTML (self-contained, escaped, no scripts), Markdown (escaped, small), atomic writes, render CLI."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from jacaudit import results as R
from jacaudit.report import parse_formats, render, write_atomic, write_reports
from tests.test_results import EVIL, example_report


def _check_html(html: str) -> None:
    assert "<script" not in html.lower()
    assert "&lt;script&gt;" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html), "external resource"
    assert "@import" not in html and "url(" not in html
    assert html.count("<html") == 1 and html.rstrip().endswith("</html>")


def test_html_escapes_and_is_self_contained():
    html = render(example_report(), "html").decode()
    _check_html(html)
    assert "data:image/png;base64," in html


def test_generic_fallback_escapes():
    rep = example_report()
    import dataclasses
    rep = dataclasses.replace(rep, kind="unknown_kind")
    html = render(rep, "html").decode()
    _check_html(html)
    assert "upper-centre" in html  # nested fields rendered as tables


def test_markdown_escapes():
    md = render(example_report(), "md").decode()
    assert "<script" not in md and "&lt;script&gt;" in md
    assert len(md.encode()) < (1 << 20)
    assert "| ig |" in md


def test_bad_image_data_is_not_injected():
    rep = example_report()
    d = json.loads(R.to_json(rep))
    d["result"]["inputs"][0]["thumbnail"]["data"] = '"><script>alert(1)</script>'
    d["result"]["inputs"][0]["thumbnail"]["mime"] = "text/html"
    html = render(R.from_dict(d), "html").decode()
    _check_html(html)


def test_write_atomic(tmp_path, monkeypatch):
    p = tmp_path / "r.json"
    write_atomic(p, b"one")
    assert p.read_bytes() == b"one"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(p, b"two")
    assert p.read_bytes() == b"one"
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]  # no temp file left


def test_write_reports_and_render_cli(tmp_path):
    rep = example_report()
    paths = write_reports(rep, str(tmp_path), parse_formats("json,html,md"))
    assert sorted(os.path.basename(p) for p in paths) == ["report.html", "report.json", "report.md"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = tmp_path / "again.html"
    p = subprocess.run([sys.executable, "-m", "jacaudit", "render", str(tmp_path / "report.json"), "-o", str(out),
                        "--validate"], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == (tmp_path / "report.html").read_bytes()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    p = subprocess.run([sys.executable, "-m", "jacaudit", "render", str(bad), "-o", str(tmp_path / "x.html")],
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2 and "not a JSON report" in p.stderr and not (tmp_path / "x.html").exists()


def test_parse_formats():
    assert parse_formats("html, markdown,json,html") == ["html", "md", "json"]
    from jacaudit.errors import InputError
    with pytest.raises(InputError):
        parse_formats("pdf")
