"""Shared test setup."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _reports_to_tmp(tmp_path, monkeypatch):
    """Commands write reports by default (./jacaudit-<command>/); in tests they go to a temporary folder.
    JACAUDIT_OUT is the config layer's environment override for every command's --out."""
    monkeypatch.setenv("JACAUDIT_OUT", str(tmp_path / "reports"))
