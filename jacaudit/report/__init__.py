"""Renderers: the report (a :class:`jacaudit.results.Report`) -> bytes, one module per format, one table.

Interface (each ``formats/<module>.py``): ``render(report) -> bytes``. Renderers compute nothing: they read the
report only (every format can be rebuilt from the JSON alone). Writing goes through :func:`write_atomic` (temp
file in the same folder, fsync, rename) so an interrupted run leaves no half report.

Adding a format = one module in ``formats/`` + one line in :data:`TABLE`; ``--format``, the help texts
(:func:`formats_help`), :func:`render`, :func:`write_reports` and :func:`format_for_path` all read the table.
Modules are imported only when a format is rendered (``jacaudit --help`` stays light).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from importlib import import_module
from typing import Any

__all__ = ["Format", "TABLE", "FORMATS", "render", "write_atomic", "write_reports", "parse_formats",
           "formats_help", "format_for_path", "lookup"]


@dataclass(frozen=True)
class Format:
    name: str            # canonical name, as returned by parse_formats
    ext: str             # file extension of report files, with the dot: stem + ext
    aliases: tuple[str, ...]
    description: str     # one line
    module: str          # module in jacaudit.report.formats with render(report) -> bytes
    read_exts: tuple[str, ...] = ()  # other extensions that mean this format (``jacaudit render -o``)


TABLE: tuple[Format, ...] = (
    Format("html", ".html", (), "self-contained HTML page (inline images, no scripts)", "html", (".htm",)),
    Format("json", ".json", (), "JSON report, the source of truth (jacaudit schema)", "json"),
    Format("md", ".md", ("markdown",), "Markdown summary (CI job summaries, under 1 MiB)", "markdown",
           (".markdown",)),
    Format("junit", ".junit.xml", ("junit-xml",), "JUnit XML, one testcase per check", "junit",
           (".xml",)),
    Format("sarif", ".sarif", (), "SARIF 2.1.0, one rule per check kind (code scanning)", "sarif",
           (".sarif.json",)),
)

#: name -> file extension (kept for callers of the old mapping)
FORMATS: dict[str, str] = {f.name: f.ext for f in TABLE}
_BY_NAME: dict[str, Format] = {**{a: f for f in TABLE for a in f.aliases}, **{f.name: f for f in TABLE}}


def formats_help() -> str:
    """The known formats for help texts: ``html, json, md (markdown), junit (junit-xml), sarif``."""
    return ", ".join(f.name + (f" ({', '.join(f.aliases)})" if f.aliases else "") for f in TABLE)


def _unknown(fmt: str, what: str):
    from ..errors import InputError

    return InputError(f"unknown {what} {fmt!r}; known formats: {formats_help()}")


def lookup(fmt: str) -> Format:
    """The table entry for a name or alias (case-insensitive); :class:`InputError` naming the known ones."""
    f = _BY_NAME.get(str(fmt).strip().lower())
    if f is None:
        raise _unknown(fmt, "report format")
    return f


def render(report: Any, fmt: str) -> bytes:
    """Render ``report`` in format ``fmt`` (a name or an alias) -> bytes."""
    return import_module(f"{__name__}.formats.{lookup(fmt).module}").render(report)


def parse_formats(text: str | None) -> list[str]:
    """``"html, markdown,junit"`` -> ``["html", "md", "junit"]`` (canonical names, in order, no repeats)."""
    if not text:
        return []
    out: list[str] = []
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        f = _BY_NAME.get(part)
        if f is None:
            raise _unknown(part, "--format")
        if f.name not in out:
            out.append(f.name)
    return out


def format_for_path(path: str | os.PathLike) -> str | None:
    """The format a file name asks for by its extension (longest match: ``x.junit.xml`` -> junit), or None."""
    name = os.path.basename(os.fspath(path)).lower()
    best: tuple[int, str] | None = None
    for f in TABLE:
        for ext in (f.ext, *f.read_exts):
            if name.endswith(ext) and len(name) > len(ext) and (best is None or len(ext) > best[0]):
                best = (len(ext), f.name)
    return None if best is None else best[1]


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
    """Render every format first, then write each atomically (``<stem><ext>``); returns the written paths."""
    rendered = [(lookup(f), render(report, f)) for f in formats]
    paths = []
    for f, data in rendered:
        p = os.path.join(out_dir, stem + f.ext)
        write_atomic(p, data)
        paths.append(p)
    return paths
