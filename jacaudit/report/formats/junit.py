"""JUnit XML: one ``<testcase>`` per check, so CI test views show every verdict.

Layout (the de-facto schema read by Jenkins, GitLab, GitHub test reporters and ``junitparser``)::

    <testsuites name="jacaudit" tests= failures= errors= skipped= time=>
      <testsuite name="jacaudit <kind>" tests= failures= errors= skipped= timestamp= time=>
        <properties> model path, sha256, jacaudit version, status, ... </properties>
        <testcase classname="jacaudit.<command>.<check>" name="<subject>">
          <properties> value, warn, fail, baseline, the check's own numbers </properties>
          <failure message= type="fail"/> | <error message= type="error"/> | <skipped message=/>
          <system-out>warn: message</system-out>          (a warn passes, with its message)
        </testcase>
      </testsuite>
    </testsuites>

Built with :mod:`xml.etree.ElementTree` (text and attributes are escaped); characters XML 1.0 forbids (control
characters, lone surrogates, U+FFFE/U+FFFF) are removed from every string first.
"""
from __future__ import annotations

import math
import re
import shlex
import xml.etree.ElementTree as ET
from typing import Any, Iterable

_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def clean(v: Any) -> str:
    """A string safe for XML 1.0: characters it cannot hold are dropped."""
    return _ILLEGAL.sub("", "" if v is None else str(v))


def _num(v: Any) -> str | None:
    if v is None or isinstance(v, bool):
        return None if v is None else str(v).lower()
    if isinstance(v, (int, float)):
        return repr(float(v)) if math.isfinite(float(v)) else None
    return clean(v)


def _properties(parent: ET.Element, items: Iterable[tuple[str, Any]]) -> None:
    rows = [(k, _num(v)) for k, v in items]
    rows = [(k, v) for k, v in rows if v is not None]
    if rows:
        props = ET.SubElement(parent, "properties")
        for k, v in rows:
            ET.SubElement(props, "property", name=clean(k), value=v)


def _total_time(report: Any) -> float:
    t = report.timings or {}
    if isinstance(t.get("total"), (int, float)) and math.isfinite(t["total"]):
        return float(t["total"])
    return float(sum(v for v in t.values() if isinstance(v, (int, float)) and math.isfinite(v)))


def render(report: Any) -> bytes:
    checks = list(report.checks or [])
    counts = {s: sum(1 for c in checks if c.status == s) for s in ("fail", "error", "skipped")}
    attrs = {"tests": str(len(checks)), "failures": str(counts["fail"]), "errors": str(counts["error"]),
             "skipped": str(counts["skipped"]), "time": f"{_total_time(report):.6f}"}
    root = ET.Element("testsuites", name="jacaudit", **attrs)
    suite = ET.SubElement(root, "testsuite", name=clean(f"jacaudit {report.kind}"), **attrs,
                          timestamp=clean(report.created))
    model = report.model
    _properties(suite, [
        ("jacaudit.version", report.version), ("jacaudit.schema_version", report.schema_version),
        ("jacaudit.command", report.kind), ("jacaudit.status", report.status),
        ("jacaudit.exit_code", str(report.exit_code)),
        ("jacaudit.command_line", shlex.join(report.command_line or [])),
        ("model.path", model.path if model else None), ("model.name", model.name if model else None),
        ("model.format", model.format if model else None), ("model.sha256", model.sha256 if model else None),
        *((f"setting.{k}", v if isinstance(v, (str, int, float, bool)) else str(v))
          for k, v in (report.settings or {}).items()),
    ])
    for c in checks:
        case = ET.SubElement(suite, "testcase", classname=clean(f"jacaudit.{c.command}.{c.check}"),
                             name=clean(c.subject or c.id), time="0")
        _properties(case, [("id", c.id), ("status", c.status), ("value", c.value), ("op", c.op),
                           ("warn", c.warn), ("fail", c.fail), ("threshold_source", c.threshold_source),
                           ("baseline", c.baseline), ("baseline_status", c.baseline_status),
                           *sorted((c.properties or {}).items())])
        msg = clean(c.message)
        if c.status == "fail":
            el = ET.SubElement(case, "failure", message=msg, type="fail")
            el.text = msg
        elif c.status == "error":
            el = ET.SubElement(case, "error", message=msg, type="error")
            el.text = msg
        elif c.status == "skipped":
            ET.SubElement(case, "skipped", message=msg)
        elif c.status == "warn":
            ET.SubElement(case, "system-out").text = f"warn: {msg}"
    if report.warnings:
        ET.SubElement(suite, "system-err").text = "\n".join(f"warning: {clean(w)}" for w in report.warnings)
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"
