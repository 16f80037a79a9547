"""The GitHub Actions job summary: the Markdown report appended to ``$GITHUB_STEP_SUMMARY``.

GitHub shows at most 1 MiB of summary per step, and every jacaudit command of a step appends to the same file,
so what is appended is cut (with a note) to fit what is left of that 1 MiB.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from .formats.markdown import LIMIT, TRUNCATED, truncate

ENV = "GITHUB_STEP_SUMMARY"

__all__ = ["append_job_summary", "ENV", "LIMIT"]


def append_job_summary(report: Any, environ: Mapping[str, str] | None = None) -> str | None:
    """Append the Markdown rendering of ``report`` to ``$GITHUB_STEP_SUMMARY`` (created if needed).

    Returns the path written, or None when the variable is unset or empty, or when the file already holds the
    full 1 MiB. A file that cannot be written raises :class:`jacaudit.errors.RuntimeFailure`.
    """
    from ..errors import RuntimeFailure
    from . import render

    env = os.environ if environ is None else environ
    path = env.get(ENV) or ""
    if not path.strip():
        return None
    try:
        used = os.path.getsize(path)
    except OSError:
        used = 0
    sep = b"\n" if used else b""
    budget = LIMIT - 1 - used - len(sep)
    if budget <= len(TRUNCATED.encode()):
        return None
    data = truncate(render(report, "md"), budget)
    if not data:
        return None
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        with open(path, "ab") as f:
            f.write(sep + data)
    except OSError as e:
        raise RuntimeFailure(f"cannot append the job summary to {path} ({ENV}): {e.strerror or e}") from None
    return path
