"""HTML report pieces: the checks table (with a baseline), readable settings, colour bars, the small-J heatmap and
its singular values, and the mask outline on saliency overlays (maps.overlay_rgb)."""
from __future__ import annotations

import dataclasses
import glob
import os
import re

import numpy as np
import pytest

from jacaudit import results as R
from jacaudit.report import render, svg
from jacaudit.results.checks import BaselineChange, BaselineComparison, Check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "reports")
EVIL = '<script>alert("x")</script>'


def _check(status: str, check: str, subject: str, value: float | None, warn: float | None, fail: float | None,
           message: str, op: str = ">", **kw) -> Check:
    return Check(id=f"x.{check}[{subject}]", command="x", check=check, subject=subject, status=status, value=value,
                 op=op, warn=warn, fail=fail, threshold_source=kw.pop("source", "default"), message=message, **kw)


def sample_checks(command: str) -> list[Check]:
    """One check of each status, with long identifiers and a hostile subject."""
    cs = [
        _check("pass", "forward_rel_error", "model", 3.2e-7, None, 1e-4, "forward_rel_error = 3.2e-07 <= fail "
               "threshold 0.0001"),
        _check("warn", "mask_outside_fraction", "circle_003_with_a_long_name.png", 0.31, 0.3, 0.6,
               "mask_outside_fraction = 0.31 > warn threshold 0.3", baseline=0.22, baseline_status="pass"),
        _check("fail", "flip_rate@eps=0.01", "sample_models/shapes/examples/square_very_long_file_name_01.png",
               0.0721234, 0.02, 0.05, "flip_rate@eps=0.01 = 0.0721234 > fail threshold 0.05", source="cli"),
        _check("error", "derivative_rel_error", "dir 2", None, None, 1e-4,
               "derivative_rel_error = n/a: no finite value to judge (the jvp was NaN)"),
        _check("skipped", "sanity_spearman", EVIL, None, None, 0.5,
               "inconclusive: nothing was randomised " + EVIL, op=">="),
    ]
    return [dataclasses.replace(c, id=c.id.replace("x.", command + ".", 1), command=command) for c in cs]


def _example(name: str) -> R.Report:
    """An example report as a schema-1.0 one: no checks/metrics/baseline, and none of the fields added since
    (heat_max, mask_outlined, the small J and its singular values), whatever the regenerated examples hold."""
    import json

    with open(os.path.join(EXAMPLES, name, "report.json")) as f:
        d = json.load(f)
    d["schema_version"] = "1.0"
    for k in ("checks", "metrics", "baseline"):
        d.pop(k, None)
    res = d["result"]
    for k in ("matrix", "singular_values"):
        res.pop(k, None)
    for inp in res.get("inputs", []):
        for m in inp.get("maps", []):
            m.pop("heat_max", None)
            m.pop("mask_outlined", None)
    return R.from_dict(d)


def kind_reports() -> dict[str, R.Report]:
    """One report of each kind, built from the example reports (no CLI), with checks of every status, a baseline
    comparison, the new saliency fields and a small J with its singular values."""
    out: dict[str, R.Report] = {}
    sal = _example("saliency-shapes")
    inputs = []
    for inp in sal.result.inputs:
        maps = [dataclasses.replace(m, heat_max=[0.0123, 2.5e-4, 1.7, 31.0][k % 4], mask_outlined=True)
                for k, m in enumerate(inp.maps)]
        inputs.append(dataclasses.replace(inp, maps=maps))
    checks = sample_checks("saliency")
    base = BaselineComparison(
        path="reports/baseline/saliency-shapes/report.json", created="2026-11-01T10:00:00+00:00",
        max_regression=0.1,
        regressions=[BaselineChange(checks[1].id, 0.31, 0.22, "warn", "pass", 0.409,
                                    f"{checks[1].id}: 0.22 -> 0.31 (40.9% worse); status pass -> warn")],
        improvements=[BaselineChange(checks[0].id, 3.2e-7, 5e-6, "pass", "pass", -0.936,
                                     f"{checks[0].id}: 5e-06 -> 3.2e-07 (93.6% better)")],
        new=[checks[2].id], missing=["saliency.old_metric[model]"])
    out["saliency"] = dataclasses.replace(sal, result=dataclasses.replace(sal.result, inputs=inputs),
                                          checks=checks, status="fail", exit_code=1, baseline=base)
    jac = _example("jacobian-arm")
    rng = np.random.default_rng(0)
    mat = (rng.standard_normal((12, 20)) * np.linspace(0.1, 3.0, 20)).round(4)
    mat[3, :] = 0.0
    sv = [float(v) for v in np.linalg.svd(mat, compute_uv=False)]  # one zero row: rank 11, sv[-1] ~ 1e-16
    res = dataclasses.replace(
        jac.result, input_shape=[1, 20], output_shape=[1, 12], jacobian_shape=[1, 12, 1, 20],
        frobenius=dataclasses.replace(jac.result.frobenius, value=float(np.linalg.norm(mat))),
        spectral=dataclasses.replace(jac.result.spectral, value=sv[0]), largest=[],
        matrix=mat.tolist(), singular_values=sv, rank=int(sum(v > 1e-6 for v in sv)), rank_tol=1e-6)
    out["jacobian"] = dataclasses.replace(
        jac, result=res, checks=[c for c in sample_checks("jacobian") if c.status in ("pass", "warn")],
        status="warn")
    ver = _example("verify-flow")
    out["verify"] = dataclasses.replace(ver, checks=sample_checks("verify")[:1])
    out["inspect"] = _example("inspect-sequence")  # schema 1.0, no checks
    return out


def _html(rep: R.Report) -> str:
    return render(rep, "html").decode()


def _assert_safe(html: str) -> None:
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)
    assert "url(" not in html and "@import" not in html


# ---------------------------------------------------------------------------------------------------------
def test_checks_table_every_status_and_baseline():
    html = _html(kind_reports()["saliency"])
    _assert_safe(html)
    sec = html[html.index('aria-label="checks"'):html.index("</section>")]
    for st in ("pass", "warn", "fail", "error", "skipped"):
        assert f'<span class="badge st-{st}">{st}</span>' in sec
        assert f'<span class="badge st-{st}">1 {st}</span>' in sec  # counts per status
    assert "0.0721 &gt; fail at 0.05" in sec and "0.31 &gt; warn at 0.3" in sec and "3.2e-7 ≤ fail at 1e-4" in sec
    assert "n/a · fail if ≥ 0.5" in sec  # skipped: the threshold it would be judged against
    assert sec.index("st-fail\">fail") < sec.index("st-pass\">pass")  # worst first
    assert "&lt;script&gt;" in sec and EVIL not in html
    assert "thresholds from cli" in sec
    # baseline: regressions and improvements, new and missing ids
    assert "1 regression" in sec and "1 improvement" in sec and "40.9%" in sec and "93.6%" in sec
    assert "old_<wbr>metric" in sec and "allowed regression" in sec
    # the checks come right after the header, before the result
    assert html.index('aria-label="checks"') < html.index("<h2>Summary</h2>")


def test_status_badge_warn_and_no_checks_line():
    reps = kind_reports()
    html = _html(reps["jacobian"])
    assert '<h1>jacaudit jacobian report <span class="badge st-warn">warn</span>' in html
    old = _html(reps["inspect"])  # a 1.0 report: no checks field at all
    assert "No checks in this report" in old and "<table class=\"checks\">" not in old


def test_old_report_without_checks_field_renders():
    import json
    with open(os.path.join(EXAMPLES, "verify-tabular", "report.json")) as f:
        d = json.load(f)
    for k in ("checks", "metrics", "baseline"):
        d.pop(k, None)
    rep = R.from_dict(d)
    assert rep.checks == []
    assert "No checks in this report" in _html(rep)


def test_settings_readable_not_reprs():
    html = _html(kind_reports()["saliency"])
    sec = html[html.index("<summary>Settings</summary>"):html.index("<summary>Model</summary>")]
    assert "{'" not in sec and "[64, 64]" not in sec and "None" not in sec and "True" not in sec
    assert '<ul class="kv">' in sec and '<span class="k">size</span>: <span class="num">64</span>, ' \
                                       '<span class="num">64</span>' in sec
    assert '<th>sanity</th><td>yes</td>' in sec
    assert '<span class="k">preset</span>: <span class="muted">—</span>' in sec


def test_saliency_colour_bar_and_outline_caption():
    reps = kind_reports()
    html = _html(reps["saliency"])
    assert html.count('class="cbar"') == sum(len(i.maps) for i in reps["saliency"].result.inputs)
    assert ">0.0123</text>" in html and ">2.5e-4</text>" in html and ">31</text>" in html
    assert "object mask outlined" in html
    old = _html(_example("saliency-shortcut"))  # heat_max None, mask_outlined False
    assert "relative scale" in old and "object mask outlined" not in old


def test_jacobian_heatmap_and_singular_values():
    rep = kind_reports()["jacobian"]
    html = _html(rep)
    _assert_safe(html)
    assert "J as a heatmap" in html and "output index" in html and "input index" in html
    vmax = max(abs(v) for row in rep.result.matrix for v in row)
    assert f">+{svg.compact(vmax)}</text>" in html and f">−{svg.compact(vmax)}</text>" in html
    assert "Singular values" in html and "log scale" in html and "rank tolerance 1e-6: numerical rank 11" in html
    # without the new fields: no section
    plain = _html(_example("jacobian-arm"))
    assert "J as a heatmap" not in plain and "Singular values" not in plain


def test_svg_pieces_escape_and_scale():
    m = svg.svg_matrix([[1.0, -2.0], [float("nan"), 0.0]], title=EVIL)
    assert EVIL not in m and "&lt;script&gt;" in m and "#9ca3af" in m  # NaN grey
    assert ">+2</text>" in m and ">−2</text>" in m
    lin = svg.svg_spectrum([3.0, 2.0, 1.0])
    assert "log scale" not in lin
    assert "log scale" in svg.svg_spectrum([1.0, 1e-5])
    assert ">low</text>" in svg.svg_colorbar(None) and ">1.5</text>" in svg.svg_colorbar(1.5)
    assert [svg.compact(v) for v in (0, 0.5, 1234.4, 1.25e-7, 2e6, None)] == ["0", "0.5", "1234", "1.25e-7",
                                                                          "2e6", "n/a"]


def test_colour_bar_uses_the_heatmap_colormap():
    from jacaudit.analyses import maps

    assert tuple(map(tuple, maps._ANCHORS.astype(int).tolist())) == svg.HEAT_ANCHORS == maps.ANCHORS
    # the bar's first and last colours are the colormap's ends
    bar = svg.svg_colorbar(1.0, steps=2)
    lo, hi = maps.colormap(np.array([0.25, 0.75]))
    assert "#%02x%02x%02x" % tuple(lo) in bar and "#%02x%02x%02x" % tuple(hi) in bar


# ---------------------------------------------------------------------------------------------------------
def test_overlay_outlines_a_square_mask():
    from jacaudit.analyses import maps

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    heat = rng.random((16, 20))
    mask = np.zeros((16, 20), bool)
    mask[4:10, 5:13] = True  # a 6 x 8 square
    plain = maps.overlay_rgb(pixels, heat)
    outlined = maps.overlay_rgb(pixels, heat, mask=mask)
    boundary = np.zeros_like(mask)
    boundary[4:10, 5:13] = True
    boundary[5:9, 6:12] = False
    changed = (plain != outlined).any(axis=2)
    assert (changed == boundary).all()
    assert (outlined[boundary] == maps.OUTLINE_RGB).all()
    assert boundary.sum() == 2 * 6 + 2 * 8 - 4
    # backwards compatible: positional alpha still works, no mask = the old overlay
    assert (maps.overlay_rgb(pixels, heat, 0.6) == plain).all()


def test_overlay_outline_resizes_mask_and_handles_edges():
    from jacaudit.analyses import maps

    pixels = np.full((8, 8, 3), 128, np.uint8)
    heat = np.zeros((4, 4))
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True  # top-left quarter, touching the image edge
    out = maps.overlay_rgb(pixels, heat, mask=mask)
    cyan = (out == maps.OUTLINE_RGB).all(axis=2)
    expect = np.zeros((8, 8), bool)
    expect[:4, :4] = True
    expect[1:3, 1:3] = False
    assert (cyan == expect).all()
    with pytest.raises(ValueError):
        maps.overlay_rgb(pixels, heat, mask=np.zeros((4, 4, 1), bool))


def test_every_example_report_renders():
    for p in sorted(glob.glob(os.path.join(EXAMPLES, "*", "report.json"))):
        with open(p) as f:
            _assert_safe(_html(R.from_json(f.read())))


def test_templates_never_mark_strings_safe():
    tdir = os.path.join(ROOT, "jacaudit", "report", "templates")
    for name in os.listdir(tdir):
        with open(os.path.join(tdir, name)) as f:
            text = re.sub(r"\{#.*?#\}", "", f.read(), flags=re.S)  # comments may name the rule
        assert not re.search(r"\|\s*safe\b", text), name
        assert "<script" not in text.lower(), name


def test_check_value_text():
    from jacaudit.report.formats.html import _check_value

    c = _check("fail", "m", "s", 0.0721234, 0.02, 0.05, "")
    assert _check_value(c) == "0.0721 > fail at 0.05"
    assert _check_value(dataclasses.replace(c, status="warn", value=0.03)) == "0.03 > warn at 0.02"
    assert _check_value(dataclasses.replace(c, status="pass", value=0.01)) == "0.01 ≤ warn at 0.02"
    low = _check("pass", "mask_fraction", "s", 0.7, None, 0.5, "", op="<")
    assert _check_value(low) == "0.7 ≥ fail at 0.5"
    # failed by a baseline regression while under every threshold: never claims a crossing
    reg = dataclasses.replace(c, value=0.01, baseline=0.005)
    assert _check_value(reg) == "0.01 vs baseline 0.005 (regressed)"
    assert _check_value(dataclasses.replace(c, status="error", value=None)) == "n/a · fail if > 0.05"
    assert _check_value(_check("skipped", "m", "s", None, None, None, "")) == "n/a"


def test_many_checks_fold_the_passing_ones():
    rep = kind_reports()["verify"]
    many = [dataclasses.replace(sample_checks("verify")[0], id=f"verify.x[dir {i}]", subject=f"dir {i}")
            for i in range(30)] + [sample_checks("verify")[2]]
    html = _html(dataclasses.replace(rep, checks=many, status="fail"))
    assert "<summary>30 passing checks</summary>" in html
    assert html.index("st-fail\">fail") < html.index("<summary>30 passing checks</summary>")
