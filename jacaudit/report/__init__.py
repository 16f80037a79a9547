"""Renderers: the report (a :class:`jacaudit.results.Report`) -> bytes, one module per format.

Interface (each ``formats/<name>.py``): ``render(report) -> bytes``. Writing goes through
:func:`write_atomic` (temp file in the same folder, fsync, rename) so an interrupted run leaves no half report.
Renderers compute nothing: they read the report only (HTML can be rebuilt from the JSON alone).
"""
from __future__ import annotations

import os
import tempfile
from importlib import import_module
from typing import Any

FORMATS = {"json": ".json", "html": ".html", "md": ".md"}

__all__ = ["FORMATS", "render", "write_atomic", "write_reports", "parse_formats"]


def render(report: Any, fmt: str) -> bytes:
    name = {"md": "markdown", "markdown": "markdown", "json": "json", "html": "html"}.get(fmt)
    if name is None:
        from ..errors import InputError
        raise InputError(f"unknown report format {fmt!r}; use {', '.join(FORMATS)}")
    return import_module(f"{__name__}.formats.{name}").render(report)


def parse_formats(text: str | None) -> list[str]:
    from ..errors import InputError

    if not text:
        return []
    out = []
    for f in (p.strip().lower() for p in text.split(",")):
        if not f:
            continue
        f = "md" if f == "markdown" else f
        if f not in FORMATS:
            raise InputError(f"unknown --format {f!r}; use a comma-separated list of {', '.join(FORMATS)}")
        if f not in out:
            out.append(f)
    return out


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temp file beside it, fsync, then ``os.replace``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_reports(report: Any, out_dir: str, formats: list[str], stem: str = "report") -> list[str]:
    """Render every format first, then write each atomically; returns the written paths."""
    rendered = [(f, render(report, f)) for f in formats]
    paths = []
    for f, data in rendered:
        p = os.path.join(out_dir, stem + FORMATS[f])
        write_atomic(p, data)
        paths.append(p)
    return paths
