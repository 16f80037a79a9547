"""The layout rules of jacaudit/README.md, checked on the source: format knowledge stays in models/, Typer and Rich
stay in cli/, analyses write no files, and `jacaudit --help` does not import torch."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "jacaudit"


def _sources(exclude: str) -> list[tuple[Path, str]]:
    return [(p, p.read_text(encoding="utf-8")) for p in PKG.rglob("*.py")
            if not str(p.relative_to(PKG)).startswith(exclude)]


def test_no_format_branch_outside_models():
    rx = re.compile(r"\.format\s*(==|!=|in\b)|OnnxModel|TorchScriptModel|_retarget_model|\.initializers\b")
    bad = [f"{p.relative_to(PKG)}:{i}" for p, s in _sources("models") for i, line in enumerate(s.splitlines(), 1)
           if rx.search(line)]
    assert not bad, bad


def test_no_typer_or_rich_outside_cli():
    rx = re.compile(r"^\s*(import|from)\s+(typer|rich)\b")
    bad = [f"{p.relative_to(PKG)}:{i}" for p, s in _sources("cli") for i, line in enumerate(s.splitlines(), 1)
           if rx.search(line)]
    assert not bad, bad


def test_analyses_write_no_files():
    rx = re.compile(r"\bopen\([^)]*['\"][wa]b?['\"]|np\.save\(|os\.makedirs|\.write_bytes\(|\.write_text\(")
    bad = [f"{p.name}:{i}" for p in (PKG / "analyses").glob("*.py")
           for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if rx.search(line)]
    assert not bad, bad


def test_help_does_not_import_torch():
    code = "import sys; from jacaudit.cli.main import app; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
