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
    lines = [f"Score differentiated: **{esc(r.score)}** (`{esc(r.score_tensor)}`), target {esc(r.target)}, "
             f"channel reduction {esc(r.reduction)}.", ""]
    lines += ["| input | class | score | method | concentrates at | top-10% mass | IG gap | mask mass |",
              "|---|---|---:|---|---|---:|---:|---:|"]
    for inp in r.inputs:
        cls = inp.target.label or str(inp.target.index)
        for m in inp.maps:
            c = m.concentration
            lines.append(f"| {esc(inp.name)}{' (synthetic)' if inp.synthetic else ''} | {esc(cls)} | "
                         f"{num(inp.target.score)} | {esc(m.method)} | {esc(c.region)} | {pct(c.top10_mass)} | "
                         f"{pct(m.completeness_gap) if m.completeness_gap is not None else '–'} | "
                         f"{pct(m.mask_fraction) if m.mask_fraction is not None else '–'} |")
    if r.failures:
        lines += ["", f"**{len(r.failures)} input(s) skipped:**", ""]
        lines += [f"- {esc(f.path)}: {esc(f.error)}" for f in r.failures[:50]]
    if r.sanity:
        lines += ["", "Sanity check (cascading parameter randomisation, Adebayo et al. 2018):", "",
                  "| method | final Spearman | verdict |", "|---|---:|---|"]
        for s in r.sanity:
            lines.append(f"| {esc(s.method)} | {num(s.final_spearman, 3)} | "
                         f"{'**flagged**: map barely changes' if s.flagged else 'changes'} |")
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
    lines += ["", f"u^T (J v) vs (u^T J) v: max rel error {num(a.max_rel_error, 3)} (tol {num(a.tol, 3)}) — "
                  f"{'pass' if a.passed else '**fail**'}"]
    return lines


def _inspect(report: Any) -> list[str]:
    r = report.result
    opset = ", ".join(f"{esc(k)} {v}" for k, v in (r.opset or {}).items()) or "n/a"
    lines = [f"Format {esc(r.format)}, opset {opset}, producer {esc(r.producer or '?')}, "
             f"{num(r.parameters)} parameters, {r.nodes} nodes.", "",
             "| | name | shape | dtype | differentiable |", "|---|---|---|---|---|"]
    for kind, ts in (("input", r.inputs), ("output", r.outputs)):
        lines += [f"| {kind} | {esc(t.name)} | {esc(t.shape)} | {esc(t.dtype)} | "
                  f"{'yes' if t.differentiable else 'no'} |" for t in ts]
    if r.op_histogram:
        lines += ["", "Ops: " + ", ".join(f"{esc(o.op_type)}×{o.count}" for o in r.op_histogram[:60])]
    if r.unsupported_ops:
        lines += ["", f"**{len(r.unsupported_ops)} unsupported op type(s):**", ""]
        lines += [f"- {esc(u.domain)}::{esc(u.op_type)} (opset {num(u.opset)}) in "
                  f"{esc(', '.join(u.nodes[:5]))}" for u in r.unsupported_ops]
    return lines


SECTIONS: dict[str, Callable[[Any], list[str]]] = {"saliency": _saliency, "jacobian": _jacobian,
                                                   "verify": _verify, "inspect": _inspect}


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
    body = SECTIONS.get(report.kind, _generic)(report)
    settings = ", ".join(f"{esc(k)}={esc(v)}" for k, v in report.settings.items())
    tail = ["", f"<sub>settings: {settings}; jacaudit {esc(report.version)}, schema {esc(report.schema_version)}"
                "</sub>", ""]
    text = "\n".join(head + body + tail)
    data = text.encode("utf-8")
    if len(data) > LIMIT:
        note = "\n\n_(truncated to fit 1 MiB; see the JSON report)_\n".encode()
        data = data[: LIMIT - len(note)].decode("utf-8", "ignore").rsplit("\n", 1)[0].encode() + note
    return data
