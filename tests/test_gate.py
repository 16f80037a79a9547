"""The gate: threshold grammar, statuses, report status / exit code, baseline comparison (plain data, no torch)."""
from __future__ import annotations

import math

import pytest

from jacaudit import gate
from jacaudit.errors import InputError
from jacaudit.gate import Metric


def test_grammar():
    t = gate.parse_threshold("flip_rate@eps=0.01>0.05", "fail")
    assert (t.name, t.subject, t.op, t.value, t.level) == ("flip_rate@eps=0.01", None, ">", 0.05, "fail")
    t = gate.parse_threshold(" derivative_rel_error[dir 2] <= 1e-4 ", "warn")
    assert (t.name, t.subject, t.op, t.value) == ("derivative_rel_error", "dir 2", "<=", 1e-4)
    t = gate.parse_threshold("mask_outside@method=*[*marker*]>=.6", "fail")
    assert (t.name, t.subject, t.op, t.value) == ("mask_outside@method=*", "*marker*", ">=", 0.6)
    assert [x.text for x in gate.parse_thresholds(["a>1; b<2", "c>=-3e2"], "fail")] == ["a>1", "b<2", "c>=-3e2"]
    for bad in ("flip_rate", "x>>1", "x>one", ">1", "x[a>1"):
        with pytest.raises(InputError):
            gate.parse_threshold(bad, "fail")


def test_statuses_and_messages():
    ms = [Metric("a", "s", 0.07, ">", warn=0.02, fail=0.05),
          Metric("a", "t", 0.03, ">", warn=0.02, fail=0.05),
          Metric("a", "u", 0.01, ">", warn=0.02, fail=0.05),
          Metric("acc", "all", 0.6, "<", fail=0.8),
          Metric("n", "all", float("nan"), ">", fail=0.0),
          Metric("z", "all", 0.0, ">", fail=1.0, status="skipped", note="derivative is zero everywhere"),
          Metric("info", "all", 3.0)]  # no threshold: a metric, not a check
    checks = gate.evaluate("cmd", ms)
    st = {c.id: c.status for c in checks}
    assert st == {"cmd.a[s]": "fail", "cmd.a[t]": "warn", "cmd.a[u]": "pass", "cmd.acc[all]": "fail",
                  "cmd.n[all]": "error", "cmd.z[all]": "skipped"}
    c = next(c for c in checks if c.id == "cmd.a[s]")
    assert "0.07 > fail threshold 0.05" in c.message and (c.warn, c.fail) == (0.02, 0.05)
    assert next(c for c in checks if c.id == "cmd.a[u]").message == "a = 0.01 <= fail threshold 0.05"
    assert gate.report_status(checks) == "fail" and gate.exit_code_for("fail") == 1
    assert gate.exit_code_for("fail", exit_zero=True) == 0
    assert gate.report_status([c for c in checks if c.status in ("pass", "warn")]) == "warn"
    assert gate.report_status([c for c in checks if c.status in ("pass", "skipped")]) == "pass"
    assert gate.exit_code_for("warn") == 0


def test_user_thresholds_replace_defaults_and_must_match():
    ms = [Metric("flip_rate@eps=0.01", "all", 0.07, ">", warn=0.1), Metric("flip_rate@eps=0.03", "all", 0.2, ">")]
    ts = gate.parse_thresholds("flip_rate@eps=0.01>0.05", "fail") + gate.parse_thresholds("flip_rate@*>0.5", "warn")
    checks = {c.id: c for c in gate.evaluate("robustness", ms, ts)}
    c1 = checks["robustness.flip_rate@eps=0.01[all]"]
    assert c1.status == "fail" and c1.fail == 0.05 and c1.warn == 0.5 and c1.threshold_source == "cli"
    assert checks["robustness.flip_rate@eps=0.03[all]"].status == "pass"
    with pytest.raises(InputError, match="matches no metric"):
        gate.evaluate("robustness", ms, gate.parse_thresholds("flip_rte>0.1", "fail"))


def _report(checks, metrics, kind="robustness"):
    """A baseline report as JSON holds it (only the parts the comparison reads)."""
    import dataclasses
    return {"kind": kind, "created": "2026-01-01T00:00:00+00:00",
            "checks": [dataclasses.asdict(c) for c in checks], "metrics": [dataclasses.asdict(m) for m in metrics]}


def test_baseline_catches_a_planted_regression():
    old_m = [Metric("flip_rate@eps=0.01", "all", 0.04, ">", fail=0.05), Metric("spectral_norm", "x", 10.0, ">"),
             Metric("robust_acc", "all", 0.90, "<", fail=0.5)]
    new_m = [Metric("flip_rate@eps=0.01", "all", 0.048, ">", fail=0.05), Metric("spectral_norm", "x", 13.0, ">"),
             Metric("robust_acc", "all", 0.95, "<", fail=0.5)]
    old_checks = gate.evaluate("robustness", old_m)
    base = _report(old_checks, gate.metric_values("robustness", old_m))
    checks = gate.evaluate("robustness", new_m)
    mv = gate.metric_values("robustness", new_m)
    # without --max-regression: listed, nothing fails
    listed, comp = gate.compare_baseline("robustness", checks, mv, base, "old.json")
    assert {r.id for r in comp.regressions} == {"robustness.flip_rate@eps=0.01[all]", "robustness.spectral_norm[x]"}
    assert [r.id for r in comp.improvements] == ["robustness.robust_acc[all]"]
    assert gate.report_status(listed) == "pass"
    fr = next(c for c in listed if c.check == "flip_rate@eps=0.01")
    assert fr.baseline == 0.04 and fr.baseline_status == "pass"
    reg = next(r for r in comp.regressions if r.id.endswith("[all]"))
    assert reg.change == pytest.approx(0.2)  # 0.04 -> 0.048 is 20% worse
    # with --max-regression 0.1: both regressions fail (the flip rate is still under its own threshold)
    gated, comp = gate.compare_baseline("robustness", checks, mv, base, "old.json", max_regression=0.1)
    st = {c.id: c.status for c in gated}
    assert st["robustness.flip_rate@eps=0.01[all]"] == "fail"
    assert st["robustness.spectral_norm[x]"] == "fail"  # a metric without threshold became a check
    assert st["robustness.robust_acc[all]"] == "pass"
    assert gate.report_status(gated) == "fail"
    # a regression within the allowance passes
    ok, _ = gate.compare_baseline("robustness", checks, mv, base, "old.json", max_regression=0.5)
    assert gate.report_status(ok) == "pass"
    with pytest.raises(InputError, match="not `verify`"):
        gate.compare_baseline("verify", checks, mv, base, "old.json")


def test_worse_by_is_directional():
    assert gate._worse_by(2.0, 1.0, ">") == 1.0 and gate._worse_by(2.0, 1.0, "<") == -1.0
    assert gate._worse_by(1.0, 0.0, ">") == math.inf and gate._worse_by(0.0, 0.0, ">") == 0.0
