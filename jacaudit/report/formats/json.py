"""JSON: the source of truth (schema in :func:`jacaudit.results.schema`)."""
from __future__ import annotations

from typing import Any


def render(report: Any) -> bytes:
    from ...results import to_json

    return to_json(report).encode("utf-8")
