"""CI formats (JUnit XML, SARIF 2.1.0, Markdown + job summary) and the format table.

Truths that share no code with the renderers: junitparser reads the XML, a hand-written JSON Schema of SARIF
2.1.0's required properties validates the log, and counts / levels are written out by hand here.
"""
from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from jacaudit import results as R
from jacaudit.errors import InputError
from jacaudit.report import formats_help, parse_formats, render, write_reports
from jacaudit.results.checks import BaselineChange, BaselineComparison, Check
from jacaudit.results.inspect import InspectResult, InspectTensor

ROOT = Path(__file__).resolve().parents[1]
NASTY = '<script>&"\x01x'


def chk(check: str, subject: str, status: str, value: float | None = 0.5, *, warn=0.1, fail=0.3,
        command: str = "inspect", message: str | None = None, props: dict | None = None) -> Check:
    return Check(id=f"{command}.{check}[{subject}]", command=command, check=check, subject=subject, status=status,
                 value=value, op=">", warn=warn, fail=fail, threshold_source="cli",
                 message=message if message is not None else f"{check} = {value} ({status})",
                 description=f"what {check.split('@')[0]} measures", properties=props or {})


def checks_example() -> list[Check]:
    return [
        chk("flip_rate@eps=0.01", "a.png", "pass", 0.01),
        chk("flip_rate@eps=0.01", "b.png", "fail", 0.5, props={"flips": 5.0, "n": 10.0}),
        chk("flip_rate@eps=0.03", "b.png", "warn", 0.2),
        chk("sanity_spearman", "ig", "error", None, message="no finite value"),
        chk("mask_outside_fraction", "c.png", "skipped", None, message="no mask: inconclusive"),
        chk("mask_outside_fraction", NASTY, "fail", 0.9, message="bad " + NASTY),
    ]


def inspect_result() -> InspectResult:
    t = InspectTensor("x", [1, 3], "float32", True)
    return InspectResult(format="onnx", path="models/m.onnx", sha256="cd" * 32, opset={"ai.onnx": 17},
                         ir_version=8, producer="test", inputs=[t], outputs=[t], op_histogram=[], nodes=0,
                         parameters=0, optimizations=None, unsupported_ops=[], supported=True)


def report(checks=None, *, model_path="models/m.onnx", baseline=None, warnings=None) -> R.Report:
    ident = R.ModelIdentity(path=model_path, name="m.onnx", format="onnx", sha256="cd" * 32,
                            opset={"ai.onnx": 17}, producer="test", parameters=0, inputs=[], outputs=[])
    return R.make_report("inspect", inspect_result(), model=ident, timings={"total": 2.5, "forward": 1.0},
                         checks=checks_example() if checks is None else checks, baseline=baseline,
                         warnings=warnings or [], argv=["jacaudit", "inspect", "models/m.onnx"], status="fail",
                         exit_code=1)


# ---------------------------------------------------------------------------------------------------------
# format table
# ---------------------------------------------------------------------------------------------------------
def test_parse_formats_and_help():
    assert parse_formats("html,markdown,junit") == ["html", "md", "junit"]
    assert parse_formats("SARIF, md ,junit-xml,json") == ["sarif", "md", "junit", "json"]
    assert parse_formats("") == [] and parse_formats(None) == []
    with pytest.raises(InputError) as e:
        parse_formats("html,pdf")
    msg = str(e.value)
    assert "pdf" in msg and all(n in msg for n in ("html", "json", "md", "junit", "sarif"))
    with pytest.raises(InputError):
        render(report(), "pdf")
    h = formats_help()
    assert h.startswith("html, json, md (markdown)") and "junit" in h and "sarif" in h


def test_write_reports_names(tmp_path):
    paths = write_reports(report(), str(tmp_path), parse_formats("html,json,md,junit,sarif"))
    assert sorted(Path(p).name for p in paths) == ["report.html", "report.json", "report.junit.xml", "report.md",
                                                   "report.sarif"]
    assert json.loads((tmp_path / "report.sarif").read_text())["version"] == "2.1.0"


def test_format_for_path():
    from jacaudit.report import format_for_path

    assert format_for_path("out/report.junit.xml") == "junit"
    assert format_for_path("r.sarif") == "sarif" and format_for_path("r.MD") == "md"
    assert format_for_path("r.txt") is None


# ---------------------------------------------------------------------------------------------------------
# JUnit
# ---------------------------------------------------------------------------------------------------------
def _junit(rep, tmp_path):
    junitparser = pytest.importorskip("junitparser", reason="junitparser is not installed (pip install .[test])")
    p = tmp_path / "r.junit.xml"
    p.write_bytes(render(rep, "junit"))
    return junitparser, junitparser.JUnitXml.fromfile(str(p)), p


def test_junit_counts(tmp_path):
    junitparser, xml, p = _junit(report(), tmp_path)
    suites = list(xml) if isinstance(xml, junitparser.JUnitXml) else [xml]
    assert len(suites) == 1
    suite = suites[0]
    assert suite.name == "jacaudit inspect"
    cases = list(suite)
    assert len(cases) == 6 and suite.tests == 6
    assert (suite.failures, suite.errors, suite.skipped) == (2, 1, 1)
    kinds = {}
    for c in cases:
        r = c.result
        kinds[(c.classname, c.name)] = type(r[0]).__name__ if r else "pass"
    assert kinds[("jacaudit.inspect.flip_rate@eps=0.01", "a.png")] == "pass"
    assert kinds[("jacaudit.inspect.flip_rate@eps=0.01", "b.png")] == "Failure"
    assert kinds[("jacaudit.inspect.flip_rate@eps=0.03", "b.png")] == "pass"  # warn passes
    assert kinds[("jacaudit.inspect.sanity_spearman", "ig")] == "Error"
    assert kinds[("jacaudit.inspect.mask_outside_fraction", "c.png")] == "Skipped"
    # plain ElementTree as a second reader: properties, warn output, suite properties
    root = ET.parse(p).getroot()
    assert root.tag == "testsuites" and root.get("tests") == "6"
    s = root.find("testsuite")
    assert float(s.get("time")) == 2.5 and s.get("timestamp") == report().created[:len(s.get("timestamp"))]
    sp = {e.get("name"): e.get("value") for e in s.find("properties")}
    assert sp["model.path"] == "models/m.onnx" and sp["model.sha256"] == "cd" * 32 and sp["jacaudit.status"] == "fail"
    assert sp["jacaudit.version"] == R.make_report("inspect", None).version
    warn = [c for c in s.iter("testcase") if c.get("classname").endswith("eps=0.03")][0]
    assert warn.find("system-out").text.startswith("warn: ")
    failed = [c for c in s.iter("testcase") if c.get("name") == "b.png"
              and c.get("classname").endswith("eps=0.01")][0]
    props = {e.get("name"): e.get("value") for e in failed.find("properties")}
    assert float(props["value"]) == 0.5 and float(props["warn"]) == 0.1 and float(props["fail"]) == 0.3
    assert float(props["flips"]) == 5.0 and float(props["n"]) == 10.0
    assert failed.find("failure").get("type") == "fail"


def test_junit_escapes_and_strips_illegal(tmp_path):
    _, xml, p = _junit(report(), tmp_path)
    raw = p.read_bytes()
    assert b"\x01" not in raw and b"<script>" not in raw
    root = ET.fromstring(raw)
    names = [c.get("name") for c in root.iter("testcase")]
    assert '<script>&"x' in names  # round-trips (minus the illegal \x01)
    bad = [c for c in root.iter("testcase") if c.get("name") == '<script>&"x'][0]
    assert bad.find("failure").get("message") == 'bad <script>&"x'


def test_junit_zero_checks(tmp_path):
    junitparser, xml, p = _junit(report(checks=[]), tmp_path)
    root = ET.parse(p).getroot()
    s = root.find("testsuite")
    assert s.get("tests") == "0" and s.get("failures") == "0" and list(s.iter("testcase")) == []


def test_junit_loads_a_1_0_report(tmp_path):
    rep = R.from_json((ROOT / "tests/data/inspect-report-1.0.json").read_text())
    assert rep.schema_version == "1.0" and rep.checks == []
    for fmt in ("junit", "sarif", "md"):
        assert render(rep, fmt)
    ET.fromstring(render(rep, "junit"))


# ---------------------------------------------------------------------------------------------------------
# SARIF
# ---------------------------------------------------------------------------------------------------------
_MSG = {"type": "object", "anyOf": [{"required": ["text"]}, {"required": ["id"]}],
        "properties": {"text": {"type": "string"}, "id": {"type": "string"}}}
_ART_LOC = {"type": "object", "properties": {"uri": {"type": "string", "format": "uri-reference"},
                                             "uriBaseId": {"type": "string"},
                                             "index": {"type": "integer", "minimum": -1}}}
SARIF_SCHEMA = {  # the required properties of SARIF 2.1.0 (OASIS spec, sections 3.13-3.49)
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object", "required": ["version", "runs"],
    "properties": {
        "$schema": {"type": "string"},
        "version": {"const": "2.1.0"},
        "runs": {"type": "array", "items": {"$ref": "#/$defs/run"}},
    },
    "$defs": {
        "run": {"type": "object", "required": ["tool"], "properties": {
            "tool": {"type": "object", "required": ["driver"],
                     "properties": {"driver": {"$ref": "#/$defs/toolComponent"}}},
            "results": {"type": "array", "items": {"$ref": "#/$defs/result"}},
            "artifacts": {"type": "array", "items": {"type": "object", "properties": {
                "location": _ART_LOC, "hashes": {"type": "object", "additionalProperties": {"type": "string"}},
                "roles": {"type": "array", "items": {"type": "string"}}}}},
            "invocations": {"type": "array", "items": {
                "type": "object", "required": ["executionSuccessful"],
                "properties": {"executionSuccessful": {"type": "boolean"}, "exitCode": {"type": "integer"},
                               "commandLine": {"type": "string"},
                               "arguments": {"type": "array", "items": {"type": "string"}},
                               "toolExecutionNotifications": {"type": "array", "items": {
                                   "type": "object", "required": ["message"],
                                   "properties": {"message": _MSG}}}}}},
        }},
        "toolComponent": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "version": {"type": "string"},
            "rules": {"type": "array", "items": {"$ref": "#/$defs/reportingDescriptor"}}}},
        "reportingDescriptor": {"type": "object", "required": ["id"], "properties": {
            "id": {"type": "string"}, "shortDescription": _MSG | {"required": ["text"]},
            "defaultConfiguration": {"type": "object", "properties": {
                "level": {"enum": ["none", "note", "warning", "error"]}}}}},
        "result": {"type": "object", "required": ["message"], "properties": {
            "message": _MSG, "ruleId": {"type": "string"}, "ruleIndex": {"type": "integer", "minimum": -1},
            "kind": {"enum": ["notApplicable", "pass", "fail", "review", "open", "informational"]},
            "level": {"enum": ["none", "note", "warning", "error"]},
            "locations": {"type": "array", "items": {"$ref": "#/$defs/location"}},
            "partialFingerprints": {"type": "object", "additionalProperties": {"type": "string"}}},
            # a kind other than fail requires level none (spec 3.27.10)
            "if": {"required": ["kind"], "properties": {"kind": {"not": {"const": "fail"}}}},
            "then": {"properties": {"level": {"const": "none"}}}},
        "location": {"type": "object", "properties": {
            "physicalLocation": {"type": "object", "anyOf": [{"required": ["address"]},
                                                             {"required": ["artifactLocation"]}],
                                 "properties": {"artifactLocation": _ART_LOC}},
            "logicalLocations": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "fullyQualifiedName": {"type": "string"}, "kind": {"type": "string"}}}},
        }},
    },
}


def _sarif(rep):
    jsonschema = pytest.importorskip("jsonschema")
    log = json.loads(render(rep, "sarif"))
    jsonschema.validate(log, SARIF_SCHEMA, cls=jsonschema.Draft202012Validator)
    return log


def test_sarif_structure_and_levels():
    log = _sarif(report())
    assert log["$schema"] == "https://json.schemastore.org/sarif-2.1.0.json"
    (run,) = log["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "jacaudit" and driver["version"]
    rules = {r["id"]: r for r in driver["rules"]}
    assert set(rules) == {"jacaudit/inspect/flip_rate", "jacaudit/inspect/sanity_spearman",
                          "jacaudit/inspect/mask_outside_fraction"}
    assert rules["jacaudit/inspect/flip_rate"]["shortDescription"]["text"] == "what flip_rate measures"
    assert rules["jacaudit/inspect/flip_rate"]["defaultConfiguration"]["level"] == "error"
    expected = {("b.png", "flip_rate@eps=0.01"): "error", ("b.png", "flip_rate@eps=0.03"): "warning",
                ("ig", "sanity_spearman"): "error", ('<script>&"\x01x', "mask_outside_fraction"): "error"}
    got = {}
    for r in run["results"]:
        assert r["ruleId"] in rules
        assert driver["rules"][r["ruleIndex"]]["id"] == r["ruleId"]
        got[(r["properties"]["subject"], r["properties"]["check"])] = r["level"]
        loc = r["locations"][0]
        assert loc["physicalLocation"]["artifactLocation"]["uri"] == "models/m.onnx"
        assert loc["physicalLocation"]["artifactLocation"]["uriBaseId"] == "%SRCROOT%"
        assert loc["logicalLocations"][0]["name"] == r["properties"]["subject"]
        assert r["partialFingerprints"]
    assert got == expected  # pass and skipped checks are not results
    bad = [r for r in run["results"] if r["properties"]["subject"] == NASTY][0]
    assert bad["message"]["text"] == "bad " + NASTY
    assert run["artifacts"][0]["location"]["uri"] == "models/m.onnx"
    assert run["artifacts"][0]["hashes"]["sha-256"] == "cd" * 32
    assert run["invocations"][0]["executionSuccessful"] is True and run["invocations"][0]["exitCode"] == 1


def test_sarif_stable_ids():
    a = _sarif(report())
    other = [dataclasses.replace(c, value=0.0, status="fail", message="other") for c in checks_example()[::-1]]
    b = _sarif(report(other))
    ids = lambda log: sorted(r["id"] for r in log["runs"][0]["tool"]["driver"]["rules"])  # noqa: E731
    assert ids(a) == ids(b)
    fp = lambda log: {r["properties"]["checkId"]: r["partialFingerprints"] for r in log["runs"][0]["results"]}  # noqa
    fa, fb = fp(a), fp(b)
    assert all(fa[k] == fb[k] for k in fa)


def test_sarif_paths_and_empty():
    log = _sarif(report(checks=[], model_path="/abs/dir/my model.onnx"))
    run = log["runs"][0]
    assert run["results"] == [] and run["tool"]["driver"]["rules"] == []
    loc = run["artifacts"][0]["location"]
    assert loc["uri"] == "file:///abs/dir/my%20model.onnx" and "uriBaseId" not in loc
    log = _sarif(dataclasses.replace(report(), model=None))
    assert all("physicalLocation" not in r["locations"][0] for r in log["runs"][0]["results"])


# ---------------------------------------------------------------------------------------------------------
# Markdown and the job summary
# ---------------------------------------------------------------------------------------------------------
def _baseline() -> BaselineComparison:
    reg = BaselineChange("inspect.flip_rate@eps=0.01[b.png]", 0.5, 0.1, "fail", "pass", 4.0, "worse")
    imp = BaselineChange("inspect.flip_rate@eps=0.01[a.png]", 0.01, 0.2, "pass", "warn", -0.95, "better")
    return BaselineComparison("old/report.json", "2026-01-01T00:00:00+00:00", 0.1, [reg], [imp],
                              ["inspect.sanity_spearman[ig]"], [])


def test_markdown_checks_table_and_baseline():
    md = render(report(baseline=_baseline()), "md").decode()
    assert "| status | check | subject | value | threshold | message |" in md
    assert "**fail**: 2" in md and "warn: 1" in md and "pass: 1" in md and "skipped: 1" in md
    table = md[md.index("### Checks"):md.index("### Baseline")]
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and "flip\\_rate" in ln]
    assert len([r for r in rows if "b.png" in r]) == 2
    assert "<script>" not in md and "&lt;script&gt;&amp;" in md
    assert md.index("### Checks") < md.index("### Baseline") < md.index("Format onnx")
    assert "Regressions" in md and "Improvements" in md and "old/report.json" in md
    assert "Format onnx" in md  # the per-kind section is kept


def test_markdown_without_checks_unchanged():
    rep = R.from_json((ROOT / "tests/data/inspect-report-1.0.json").read_text())
    md = render(rep, "md").decode()
    assert "### Checks" not in md and "Format onnx" in md


def test_job_summary(tmp_path, monkeypatch):
    from jacaudit.report.summary import append_job_summary

    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    assert append_job_summary(report()) is None
    assert append_job_summary(report(), environ={}) is None
    target = tmp_path / "sub" / "summary.md"
    env = {"GITHUB_STEP_SUMMARY": str(target)}
    assert append_job_summary(report(), environ=env) == str(target)
    first = target.read_text()
    assert "| status | check |" in first
    assert append_job_summary(report(checks=[]), environ=env) == str(target)
    both = target.read_text()
    assert both.startswith(first) and both.count("## jacaudit inspect") == 2
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "env.md"))
    assert append_job_summary(report()) == str(tmp_path / "env.md")


def test_job_summary_cap(tmp_path):
    from jacaudit.report.summary import append_job_summary

    many = [chk("flip_rate@eps=0.01", f"input {i} " + "x" * 3000, "fail", 0.5) for i in range(600)]
    rep = report(checks=many, warnings=["w" * 2000] * 400)
    assert len(render(rep, "md")) < (1 << 20)
    target = tmp_path / "s.md"
    target.write_bytes(b"a" * 700_000 + b"\n")
    assert append_job_summary(rep, environ={"GITHUB_STEP_SUMMARY": str(target)}) == str(target)
    size = target.stat().st_size
    assert 700_001 < size < (1 << 20)
    assert target.read_bytes().rstrip().endswith(b"see the JSON report)_")
    # nearly full: what is appended still fits the 1 MiB
    append_job_summary(rep, environ={"GITHUB_STEP_SUMMARY": str(target)})
    assert target.stat().st_size < (1 << 20)
    target.write_bytes(b"a" * ((1 << 20) - 10))
    assert append_job_summary(rep, environ={"GITHUB_STEP_SUMMARY": str(target)}) is None
    assert target.stat().st_size == (1 << 20) - 10
