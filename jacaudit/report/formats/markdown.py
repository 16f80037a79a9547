"""Markdown summary for CI job summaries (GitHub renders HTML inside Markdown, so text is escaped; < 1 MiB).

A result kind can register its own section in ``SECTIONS`` (kind -> function(report) -> list of lines);
otherwise a generic summary of the result's scalar fields is written.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

LIMIT = 1 << 20  # bytes


def esc(v: Any) -> str:
    """Escape text for a Markdown table cell (and for HTML inside Markdown)."""
    s = "n/a" if v is None else str(v)
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for ch in "\\`*_[]|#":
        s = s.replace(ch, "\\" + ch)
    return " ".join(s.split())


def num(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return esc(v)


def pct(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.1f}%"


def _saliency(report: Any) -> list[str]:
    r = report.result
    kind = getattr(r, "input_kind", "image")
    spec = getattr(r, "target_spec", "class")
    image = kind not in ("features", "sequence")
    shape = getattr(r, "output_shape", None)
    lines = [f"Score differentiated: **{esc(r.score)}** (`{esc(r.score_tensor)}`"
             + (f", shape (batch, {esc(', '.join(map(str, shape)))})" if shape else "") + "), "
             + (f"target {esc(r.target)}" if spec == "class" else f"explained: `{esc(spec)}`")
             + (f", differentiated with respect to `{esc(r.wrt)}`" if getattr(r, "wrt", None) else "")
             + (f", channel reduction {esc(r.reduction)}." if kind != "features" else ", per-feature attribution."),
             ""]
    where = "concentrates at | top-10% mass" if image else ("top features" if kind == "features" else
                                                            "deciding positions") + " | share"
    lines += [f"| input | {'class' if spec == 'class' else 'explained'} | score | method | {where} | IG gap | "
              f"mask mass |", "|---|---|---:|---|---|---:|---:|---:|"]
    for inp in r.inputs:
        if getattr(inp, "target_region", None):
            cls = f"sum{inp.target_region}"
        elif spec != "class":
            cls = "[" + ", ".join(map(str, inp.target_coords or [])) + "]"
        else:
            cls = inp.target.label or str(inp.target.index)
        for m in inp.maps:
            c = m.concentration
            if c is not None:
                mid = f"{esc(c.region)} | {pct(c.top10_mass)}"
            else:
                top = (m.ranking or [])[:3]
                mid = f"{esc(', '.join(a.name for a in top))} | {esc(', '.join(pct(a.share) for a in top))}"
            lines.append(f"| {esc(inp.name)}{' (synthetic)' if inp.synthetic else ''} | {esc(cls)} | "
                         f"{num(inp.target.score)} | {esc(m.method)} | {mid} | "
                         f"{pct(m.completeness_gap) if m.completeness_gap is not None else '–'} | "
                         f"{pct(m.mask_fraction) if m.mask_fraction is not None else '–'} |")
    if not image and r.inputs:
        unit = "feature" if kind == "features" else "position"
        for k, method in enumerate(r.methods):
            share: dict[int, float] = {}
            name: dict[int, str] = {}
            n = 0
            for inp in r.inputs:
                if k < len(inp.maps) and inp.maps[k].ranking:
                    n += 1
                    for a in inp.maps[k].ranking:
                        share[a.index] = share.get(a.index, 0.0) + a.share
                        name.setdefault(a.index, a.name if unit == "feature" else f"position {a.index}")
            if n:
                lines += ["", f"{esc(method)}: {unit}s by mean share of |attribution| over {n} input(s):", "",
                          f"| rank | {unit} | mean share |", "|---:|---|---:|"]
                for rank, (idx, v) in enumerate(sorted(share.items(), key=lambda kv: -kv[1])[:20], 1):
                    lines.append(f"| {rank} | {esc(name[idx])} | {pct(v / n)} |")
    if r.failures:
        lines += ["", f"**{len(r.failures)} input(s) skipped:**", ""]
        lines += [f"- {esc(f.path)}: {esc(f.error)}" for f in r.failures[:50]]
    if r.sanity:
        lines += ["", "Sanity check (cascading parameter randomisation, Adebayo et al. 2018):", "",
                  "| method | final Spearman | verdict |", "|---|---:|---|"]
        for s in r.sanity:
            lines.append(f"| {esc(s.method)} | {num(s.final_spearman, 3)} | "
                         f"{_sanity_verdict(s)} |")
    return lines


def _jacobian(report: Any) -> list[str]:
    r = report.result
    lines = [f"J = d `{esc(r.output)}` / d `{esc(r.wrt)}`, shape {esc(' x '.join(map(str, r.jacobian_shape)))}; "
             f"{esc(r.computation.mode)} mode, path {esc(r.computation.path)}, {esc(r.computation.dtype)} on "
             f"{esc(r.computation.device)}" + (" — **synthetic input**" if r.synthetic_input else "") + ".", "",
             "| quantity | value | how |", "|---|---:|---|",
             f"| Frobenius norm | {num(r.frobenius.value, 6)} | {esc(r.frobenius.method)}"
             + (f" ± {num(r.frobenius.stderr)}" if r.frobenius.method != "exact" and r.frobenius.stderr is not None
                else "") + " |",
             f"| spectral norm | {num(r.spectral.value, 6)} | {esc(r.spectral.method)}"
             + ((" (converged)" if r.spectral.converged else " (**not converged**)")
                if r.spectral.method == "power-iteration" else "") + " |",
             f"| rank estimate | {num(r.rank)} | tol {num(r.rank_tol, 3)} |"]
    if r.largest:
        lines += ["", "| output index | input index | value |", "|---|---|---:|"]
        lines += [f"| ({esc(', '.join(map(str, e.output_index)))}) | ({esc(', '.join(map(str, e.input_index)))}) | "
                  f"{num(e.value, 6)} |" for e in r.largest]
    if r.linearity is not None:
        lines += ["", "Local linearity, worst relative error of f(x) + J D by step:", "",
                  "| step | error | direction |", "|---:|---:|---|"]
        lines += [f"| {num(w.step, 3)} | {num(w.error, 3)} | {esc(w.direction)} |" for w in r.linearity.worst_by_step]
    if r.saved:
        lines += ["", f"J saved to `{esc(r.saved)}`."]
    return lines


def _verify(report: Any) -> list[str]:
    r = report.result
    f = r.forward
    lines = [f"Verdict **{esc(r.verdict)}**: d `{esc(r.output)}` / d `{esc(r.wrt)}`, engine {esc(r.dtype)}, "
             f"reference {esc(r.reference)}" + (" — **synthetic input**" if r.synthetic_input else "") + ".", ""]
    if f.reference != "none":
        lines += [f"Forward vs {esc(f.reference)}: max rel {num(f.max_rel, 3)} (tol {num(f.tol, 3)}) — "
                  f"{'pass' if f.passed else '**fail**'}", ""]
    lines += ["| dir | reference | status | rel error | tol | \\|Jv\\| | \\|FD\\| |",
              "|---:|---|---|---:|---:|---:|---:|"]
    for d in r.directions:
        st = "**fail**" if d.status == "fail" else esc(d.status)
        lines.append(f"| {d.index} | {esc(d.reference)} | {st} | {num(d.rel_error, 3)} | {num(d.tol, 3)} | "
                     f"{num(d.jvp_norm, 6)} | {num(d.fd_norm, 6)} |")
    a = r.adjoint
    verdict = getattr(a, "status", "") or ("pass" if a.passed else "fail")
    shown = {"fail": "**fail**", "skipped": "skipped (no evidence: jvp/vjp at rounding level)"}.get(verdict, verdict)
    lines += ["", f"u^T (J v) vs (u^T J) v: max rel error {num(a.max_rel_error, 3)} (tol {num(a.tol, 3)}) — {shown}"]
    return lines


def _inspect(report: Any) -> list[str]:
    r = report.result
    opset = ", ".join(f"{esc(k)} {v}" for k, v in (r.opset or {}).items()) or "n/a"
    lines = [f"Format {esc(r.format)}, opset {opset}, producer {esc(r.producer or '?')}, "
             f"{num(r.parameters)} parameters, {r.nodes} nodes.", "",
             "| | name | shape | dtype | differentiable |", "|---|---|---|---|---|"]
    for kind, ts in (("input", r.inputs), ("output", r.outputs)):
        lines += [f"| {kind} | {esc(t.name)} | {esc(t.shape)} | {esc(t.dtype)} | "
                  f"{ {True: 'yes', False: 'no'}.get(t.differentiable, 'unknown') } |" for t in ts]
    if r.op_histogram:
        lines += ["", "Ops: " + ", ".join(f"{esc(o.op_type)}×{o.count}" for o in r.op_histogram[:60])]
    if r.unsupported_ops:
        lines += ["", f"**{len(r.unsupported_ops)} unsupported op type(s):**", ""]
        lines += [f"- {esc(u.domain)}::{esc(u.op_type)} (opset {num(u.opset)}) in "
                  f"{esc(', '.join(u.nodes[:5]))}" for u in r.unsupported_ops]
    return lines


def _robustness(report: Any) -> list[str]:
    r = report.result
    lines = [f"{r.n_inputs} input(s), clean accuracy {num(r.clean_accuracy, 3)} (labels: {esc(r.labels_source)}); "
             f"attacked {esc(r.score)} `{esc(r.score_tensor)}`; epsilon in {esc(r.units)}, clipped to "
             f"[{num(r.range[0])}, {num(r.range[1])}].", "",
             "| attack | eps | robust acc. | flip rate | mean margin drop |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {esc(p.attack)} | {num(p.eps, 4)} | {num(p.robust_accuracy, 3)} | {num(p.flip_rate, 3)} | "
              f"{num(p.mean_margin_drop, 4)} |" for p in r.sweep]
    if r.flip_eps is not None:
        fe = r.flip_eps
        lines += ["", f"Minimal flipping epsilon (PGD L-inf): median {num(fe.median, 4)}; {fe.never_flipped} "
                  f"never flipped, {fe.misclassified} misclassified clean."]
    if r.norms is not None:
        nm = r.norms
        lines += ["", f"||J||_F mean {num(nm.frobenius.get('mean'), 4)} ({esc(nm.frobenius_method)}), "
                  f"||J||_2 median {num(nm.spectral.get('median'), 4)}, p95 {num(nm.spectral.get('p95'), 4)}; "
                  f"observed max ||df||/||dx|| {num(nm.observed_ratio_max, 4)}."]
    flagged = [f for f in r.masking if f.flagged]
    if flagged:
        lines += ["", "**Gradient masking symptoms:**", ""]
        lines += [f"- {esc(f.name)}: {esc(f.evidence)}" for f in flagged]
    return lines


SECTIONS: dict[str, Callable[[Any], list[str]]] = {"saliency": _saliency, "jacobian": _jacobian,
                                                   "verify": _verify, "inspect": _inspect,
                                                   "robustness": _robustness,
                                                   "transfer": lambda rep: __import__(
                                                       "jacaudit.results.transfer", fromlist=["_"]).markdown_lines(rep),
                                                   **{k: (lambda rep, k=k: __import__(f"jacaudit.results.{k}", fromlist=["_"]).markdown_lines(rep)) for k in ("geometry", "gradflow")}}


def _generic(report: Any) -> list[str]:
    r = report.result
    rows = []
    if dataclasses.is_dataclass(r):
        for f in dataclasses.fields(r):
            v = getattr(r, f.name)
            if isinstance(v, (str, int, float, bool)) or v is None:
                rows.append(f"| {esc(f.name)} | {num(v)} |")
            elif isinstance(v, (list, tuple)):
                rows.append(f"| {esc(f.name)} | {len(v)} item(s) |")
    return ["| field | value |", "|---|---|", *rows] if rows else []


_STATUS_ORDER = ("fail", "error", "warn", "skipped", "pass")
#: rows of the checks table before the rest is summarised (the full list is in the JSON / JUnit / SARIF)
MAX_CHECK_ROWS = 500


def _threshold(c: Any) -> str:
    parts = []
    if c.fail is not None:
        parts.append(f"fail {esc(c.op)} {num(c.fail, 6)}")
    if c.warn is not None:
        parts.append(f"warn {esc(c.op)} {num(c.warn, 6)}")
    return ", ".join(parts) or "–"


def _status(s: str) -> str:
    return f"**{esc(s)}**" if s in ("fail", "error") else esc(s)


def checks_section(report: Any) -> list[str]:
    """Status counts and one row per check (worst first), escaped."""
    checks = list(getattr(report, "checks", None) or [])
    if not checks:
        return []
    counts = [(s, sum(1 for c in checks if c.status == s)) for s in _STATUS_ORDER]
    lines = ["### Checks", "", ", ".join(f"{_status(s)}: {n}" for s, n in counts if n), "",
             "| status | check | subject | value | threshold | message |", "|---|---|---|---:|---|---|"]
    rank = {s: i for i, s in enumerate(_STATUS_ORDER)}
    ordered = sorted(checks, key=lambda c: rank.get(c.status, len(rank)))  # stable: analysis order within
    for c in ordered[:MAX_CHECK_ROWS]:
        lines.append(f"| {_status(c.status)} | {esc(c.check)} | {esc(c.subject)} | {num(c.value, 6)} | "
                     f"{_threshold(c)} | {esc(c.message)} |")
    if len(ordered) > MAX_CHECK_ROWS:
        lines += ["", f"_{len(ordered) - MAX_CHECK_ROWS} more check(s) not shown; see the JSON report._"]
    return lines + [""]


def _changes(title: str, items: list[Any]) -> list[str]:
    if not items:
        return []
    lines = [f"**{title}** ({len(items)}):", "", "| check | baseline | now | change | status |",
             "|---|---:|---:|---:|---|"]
    for ch in items[:MAX_CHECK_ROWS]:
        st = esc(ch.status) if ch.baseline_status in (None, ch.status) else \
            f"{esc(ch.baseline_status)} → {esc(ch.status)}"
        lines.append(f"| {esc(ch.id)} | {num(ch.baseline, 6)} | {num(ch.value, 6)} | {pct(ch.change)} | {st} |")
    if len(items) > MAX_CHECK_ROWS:
        lines.append(f"| … {len(items) - MAX_CHECK_ROWS} more | | | | |")
    return lines + [""]


def baseline_section(report: Any) -> list[str]:
    b = getattr(report, "baseline", None)
    if b is None:
        return []
    allowed = "listed only" if b.max_regression is None else f"allowed worsening {pct(b.max_regression)}"
    lines = ["### Baseline", "",
             f"Compared with `{esc(b.path)}`" + (f" ({esc(b.created)})" if b.created else "") +
             f": {len(b.regressions)} regression(s), {len(b.improvements)} improvement(s), {len(b.new)} new, "
             f"{len(b.missing)} missing; {allowed}.", ""]
    lines += _changes("Regressions", list(b.regressions)) + _changes("Improvements", list(b.improvements))
    for title, ids in (("New", b.new), ("Missing", b.missing)):
        if ids:
            shown = ", ".join(esc(i) for i in ids[:50]) + (f" and {len(ids) - 50} more" if len(ids) > 50 else "")
            lines += [f"{title}: {shown}", ""]
    return lines


TRUNCATED = "\n\n_(truncated to fit 1 MiB; see the JSON report)_\n"


def truncate(data: bytes, limit: int = LIMIT) -> bytes:
    """``data`` cut at a line boundary, with a note, so that it stays within ``limit`` bytes."""
    if len(data) <= limit:
        return data
    note = TRUNCATED.encode()
    if limit <= len(note):
        return b""
    body = data[: limit - len(note)].decode("utf-8", "ignore")
    if "\n" in body:
        body = body.rsplit("\n", 1)[0]
    return body.encode() + note


def render(report: Any) -> bytes:
    model = report.model.name if report.model else "?"
    head = [f"## jacaudit {esc(report.kind)}: {esc(model)} — **{esc(report.status)}** (exit {report.exit_code})",
            ""]
    if report.model and report.model.sha256:
        head += [f"Model `{esc(report.model.format)}` sha256 `{esc(report.model.sha256[:16])}…`", ""]
    for w in report.warnings:
        head.append(f"> ⚠ {esc(w)}")
    if report.warnings:
        head.append("")
    head += checks_section(report) + baseline_section(report)
    body = SECTIONS.get(report.kind, _generic)(report)
    if getattr(report, "checks", None) or getattr(report, "baseline", None):
        body = ["### Result", "", *body]
    settings = ", ".join(f"{esc(k)}={esc(v)}" for k, v in report.settings.items())
    tail = ["", f"<sub>settings: {settings}; jacaudit {esc(report.version)}, schema {esc(report.schema_version)}"
                "</sub>", ""]
    text = "\n".join(head + body + tail)
    return truncate(text.encode("utf-8"), LIMIT - 1)


def _sanity_verdict(s) -> str:
    st = getattr(s, "status", "checked")
    if st in ("skipped", "error"):
        return f"**{st}**: {esc(s.reason or '')}"
    v = "**flagged**: map barely changes" if s.flagged else "changes"
    return v + (f" (partial: {esc(s.reason or '')})" if st == "partial" else "")
