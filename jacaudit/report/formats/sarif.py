"""SARIF 2.1.0 (OASIS; GitHub code scanning reads it): one rule per check kind, one result per problem.

* Rules: ``jacaudit/<command>/<check>``, the check's name cut at ``@`` (``flip_rate@eps=0.01`` ->
  ``jacaudit/saliency/flip_rate``) so the id is stable across settings; every check of that kind points to it.
  ``defaultConfiguration.level`` is ``error`` when one of its checks has a fail threshold, else ``warning``.
* Results: one per check whose status is warn (level ``warning``), fail or error (level ``error``). Passing and
  skipped checks are not results (code scanning would show them as alerts: it ignores ``result.kind``); their
  counts are in ``run.properties``. The full check name, subject, value and thresholds are in the result's
  ``properties``; ``partialFingerprints`` hold the check id, which is stable across runs.
* Location: the model file (``artifactLocation.uri``: relative to ``%SRCROOT%`` when the report names it by a
  relative path, else a ``file:`` URI) plus a logical location for the subject.
"""
from __future__ import annotations

import json
import math
import re
import shlex
from typing import Any
from urllib.parse import quote

SCHEMA_URI = "https://json.schemastore.org/sarif-2.1.0.json"
LEVELS = {"warn": "warning", "fail": "error", "error": "error"}
FINGERPRINT = "jacauditCheckId/v1"
SRCROOT = "%SRCROOT%"


def rule_id(command: str, check: str) -> str:
    """The stable rule id of a check kind: ``jacaudit/<command>/<check name before '@'>``."""
    base = check.split("@", 1)[0].strip() or check
    base = re.sub(r"[^A-Za-z0-9_.\-]+", "_", base).strip("_") or "check"
    cmd = re.sub(r"[^A-Za-z0-9_.\-]+", "_", command) or "command"
    return f"jacaudit/{cmd}/{base}"


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _bag(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _finite(v) for k, v in d.items() if _finite(v) is not None}


def artifact_location(path: str) -> dict[str, Any]:
    """A model path as a SARIF artifactLocation: relative -> uri + uriBaseId, absolute -> ``file:`` URI."""
    p = path.replace("\\", "/")
    if re.match(r"^[A-Za-z]:/", p):  # a Windows drive path
        return {"uri": "file:///" + p[:2] + quote(p[2:])}
    if p.startswith("/"):
        return {"uri": "file://" + quote(p)}
    while p.startswith("./"):
        p = p[2:]
    return {"uri": quote(p), "uriBaseId": SRCROOT}


def _utc(ts: str | None) -> str | None:
    if not ts:
        return None
    return ts[:-6] + "Z" if ts.endswith("+00:00") else ts


def _rule_description(checks: list[Any], base: str) -> str:
    for c in checks:
        if c.description:
            return c.description
    return base.replace("_", " ")


def build(report: Any) -> dict[str, Any]:
    """The SARIF log as a dict (``render`` writes it as JSON)."""
    checks = list(report.checks or [])
    kinds: dict[str, list[Any]] = {}
    for c in checks:
        kinds.setdefault(rule_id(c.command, c.check), []).append(c)
    rules, index = [], {}
    for rid, cs in kinds.items():
        base = rid.rsplit("/", 1)[1]
        index[rid] = len(rules)
        text = _rule_description(cs, base)
        rules.append({
            "id": rid,
            "name": base,
            "shortDescription": {"text": text},
            "fullDescription": {"text": f"jacaudit {cs[0].command}: {text}"},
            "defaultConfiguration": {"level": "error" if any(c.fail is not None for c in cs) else "warning"},
            "properties": {"tags": ["jacaudit", cs[0].command]},
        })

    model = report.model
    artifacts, physical = [], None
    if model is not None and model.path:
        loc = artifact_location(model.path)
        art: dict[str, Any] = {"location": loc, "roles": ["analysisTarget"]}
        if model.format:
            art["properties"] = {"format": model.format}
        if model.sha256:
            art["hashes"] = {"sha-256": model.sha256}
        artifacts.append(art)
        physical = {"artifactLocation": {**loc, "index": 0}}

    results = []
    for c in checks:
        if c.status not in LEVELS:
            continue
        rid = rule_id(c.command, c.check)
        location: dict[str, Any] = {"logicalLocations": [
            {"name": c.subject, "fullyQualifiedName": c.id, "kind": "object"}]}
        if physical is not None:
            location = {"physicalLocation": physical, **location}
        results.append({
            "ruleId": rid,
            "ruleIndex": index[rid],
            "kind": "fail",
            "level": LEVELS[c.status],
            "message": {"text": c.message or f"{c.check} [{c.subject}]: {c.status}"},
            "locations": [location],
            "partialFingerprints": {FINGERPRINT: c.id},
            "properties": _bag({"check": c.check, "subject": c.subject, "status": c.status, "value": c.value,
                                "op": c.op, "warn": c.warn, "fail": c.fail,
                                "thresholdSource": c.threshold_source, "baseline": c.baseline,
                                "baselineStatus": c.baseline_status, "checkId": c.id,
                                "metrics": _bag(dict(c.properties or {})) or None}),
        })

    invocation: dict[str, Any] = {
        "executionSuccessful": report.status != "error",
        "exitCode": int(report.exit_code),
        "commandLine": shlex.join(report.command_line or []),
        "arguments": list((report.command_line or [])[1:]),
    }
    if _utc(report.created):
        invocation["endTimeUtc"] = _utc(report.created)
    if report.warnings:
        invocation["toolExecutionNotifications"] = [{"message": {"text": str(w)}, "level": "warning"}
                                                    for w in report.warnings]
    counts = {s: sum(1 for c in checks if c.status == s) for s in ("pass", "warn", "fail", "error", "skipped")}
    run: dict[str, Any] = {
        "tool": {"driver": {"name": "jacaudit", "version": str(report.version),
                            "semanticVersion": str(report.version), "rules": rules}},
        "invocations": [invocation],
        "artifacts": artifacts,
        "results": results,
        "properties": {"status": report.status, "command": report.kind, "schemaVersion": report.schema_version,
                       "checks": counts},
    }
    return {"$schema": SCHEMA_URI, "version": "2.1.0", "runs": [run]}


def render(report: Any) -> bytes:
    return (json.dumps(build(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
