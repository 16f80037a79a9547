"""Result of ``jacaudit geometry``: the local geometry of J = d output / d input at one input or along a trajectory
(singular values, rank, conditioning, det / log|det|, manipulability, lost directions, Gauss-Newton curvature, and
for a normalizing flow the log-det discrepancy and the change-of-variables log-density)."""
from __future__ import annotations

from dataclasses import dataclass, field

from . import result_type


@dataclass(frozen=True)
class LostDirection:
    """A direction lost at a (near-)singular input: a singular pair whose value is at or below the threshold."""

    sigma: float = field(metadata={"doc": "its singular value (0 for a direction J cannot reach at all: the "
                                          "extra dimensions of the larger side)"})
    side: str = field(metadata={"doc": "input (a null-space vector: moving the input along it does not move the "
                                       "output to first order) or output (a left null-space vector: an output "
                                       "direction no input change reaches)"})
    vector: list[float] = field(metadata={"doc": "unit vector, flattened in row-major order (sign arbitrary)"})


@dataclass(frozen=True)
class GaussNewton:
    """The Gauss-Newton curvature J^T J (the matrix Levenberg-Marquardt damps)."""

    eigenvalues: list[float] = field(metadata={
        "doc": "eigenvalues of J^T J known (sigma_i^2), largest first; the n - min(m, n) structural zeros are "
               "not listed"})
    condition_number: float | None = field(metadata={
        "doc": "lambda_max / lambda_min of J^T J (n x n); inf when J^T J is singular (rank below n, always when "
               "m < n): Gauss-Newton then needs damping"})
    rank_deficit: int | None = field(metadata={"doc": "n minus the numerical rank: zero eigenvalues of J^T J"})
    method: str = field(metadata={"doc": "svd (exact) or lanczos (Ritz values of the smaller Gram matrix)"})
    bound: str = field(default="exact", metadata={
        "doc": "exact, or lower-bound when lambda_min's Ritz value had not converged (Ritz values lie inside the "
               "spectrum, so the condition number is then at least this)"})


@dataclass(frozen=True)
class GeometryPoint:
    """The geometry of J at one input."""

    index: int
    label: str
    t: float | None = field(metadata={"doc": "position along a --line (0 at A, 1 at B); None otherwise"})
    input: list[float] | None = field(metadata={"doc": "the input's values (flattened) when at most 16"})
    finite: bool
    method: str = field(metadata={"doc": "svd (J materialised) or lanczos (J never materialised)"})
    singular_values: list[float] | None = field(metadata={
        "doc": "the singular values of J known, largest first (all min(m, n) with svd; Lanczos: the Ritz values)"})
    sigma_max: float | None
    sigma_min: float | None = field(metadata={"doc": "the smallest of the min(m, n) singular values"})
    rank: int | None = field(metadata={"doc": "singular values above rank_tol (None: not computed)"})
    rank_tol: float | None = field(metadata={"doc": "sigma_max * max(m, n) * eps(dtype)"})
    condition_number: float | None = field(metadata={"doc": "sigma_max / sigma_min (inf when sigma_min = 0)"})
    singular: bool | None = field(metadata={"doc": "sigma_min at or below the singularity threshold"})
    threshold: float | None = field(metadata={"doc": "the singularity threshold at this input"})
    manipulability: float | None = field(metadata={
        "doc": "Yoshikawa's index sqrt(det(J J^T)) = product of the singular values when m <= n; 0 when m > n "
               "(J J^T is then singular)"})
    det: float | None = field(metadata={"doc": "det J (square J only)"})
    logdet: float | None = field(metadata={"doc": "log|det J| by slogdet in float64 (square J only; -inf: det 0)"})
    logdet_sv: float | None = field(default=None, metadata={
        "doc": "log|det J| as the sum of log singular values (the same number another way)"})
    logdet_model: float | None = field(default=None, metadata={"doc": "the model's own log-det output"})
    logdet_discrepancy: float | None = field(default=None, metadata={"doc": "|logdet - logdet_model|"})
    log_density: float | None = field(default=None, metadata={
        "doc": "change of variables under a standard normal base: log N(f(x); 0, I) + log|det J|"})
    lost: list[LostDirection] = field(default_factory=list)
    null_dim: int | None = field(default=None, metadata={"doc": "n - rank: dimension of the null space"})
    left_null_dim: int | None = field(default=None, metadata={"doc": "m - rank: of the left null space"})
    gauss_newton: GaussNewton | None = None
    converged: bool | None = field(default=None, metadata={"doc": "Lanczos: the Ritz values listed converged"})
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Crossing:
    """A singular input located between two consecutive trajectory inputs where det J changes sign (bisection
    on the straight segment between them)."""

    between: list[int] = field(metadata={"doc": "the two trajectory indices"})
    fraction: float = field(metadata={"doc": "position on the segment (0: the first index, 1: the second)"})
    t: float | None = field(metadata={"doc": "position along a --line (0 at A, 1 at B)"})
    input: list[float] | None = field(metadata={"doc": "the located input (flattened) when at most 16 values"})
    sigma_min: float
    det: float
    width: float = field(metadata={"doc": "length of the final bisection interval (as a fraction of the segment)"})
    lost: list[LostDirection] = field(default_factory=list, metadata={
        "doc": "the directions lost there: the singular vectors of the smallest singular value"})


@dataclass(frozen=True)
class SensitivityMap:
    """One output element's row of J laid out on the input's spatial grid (visuomotor: delta u_k ~ sum of
    map * delta pixels)."""

    output_index: int = field(metadata={"doc": "the output element (flattened index)"})
    map: list[list[float]] = field(metadata={"doc": "dy_k / dx on the H x W grid, summed over the channels"})
    peak: list[int] = field(metadata={"doc": "[row, column] of the largest |entry|"})
    abs_sum: float = field(metadata={"doc": "sum of |entries| over the grid and channels"})


@dataclass(frozen=True)
class GeometrySeries:
    """Plot series along the trajectory (log10 of the positive values; None where undefined)."""

    log10_sigma: list[list[float | None]] = field(metadata={
        "doc": "per singular-value index (largest first), its log10 along the trajectory"})
    log10_condition: list[float | None]
    log10_manipulability: list[float | None]
    logdet: list[float | None]


@result_type("geometry")
@dataclass(frozen=True)
class GeometryResult:
    """J = d output / d wrt at one input or along a trajectory of inputs."""

    input_name: str
    wrt: str
    output: str
    input_shape: list[int]
    output_shape: list[int]
    m: int = field(metadata={"doc": "output elements (rows of J)"})
    n: int = field(metadata={"doc": "input elements (columns of J)"})
    square: bool
    source: str = field(metadata={"doc": "point, trajectory (an array of inputs) or line (between two inputs)"})
    source_detail: str
    synthetic_input: bool
    threshold: float | None = field(metadata={"doc": "the absolute singularity threshold given (None: each input's "
                                                     "numerical rank tolerance)"})
    dtype: str
    device: str
    points: list[GeometryPoint]
    singular_points: list[int] = field(metadata={"doc": "indices of the inputs where sigma_min <= threshold"})
    crossings: list[Crossing] = field(default_factory=list)
    series: GeometrySeries | None = None
    logdet_output: str | None = None
    density: bool = field(default=False, metadata={"doc": "the change-of-variables log-density was computed"})
    logits: bool = False
    maps: list[SensitivityMap] = field(default_factory=list, metadata={
        "doc": "image inputs (N, C, H, W) with few outputs: each output's row of J at the first input as a map"})


def markdown_lines(report) -> list[str]:
    """The Markdown section of a geometry report (registered in ``report/formats/markdown.py``'s ``SECTIONS``)."""
    from ..report.formats.markdown import esc, num

    r = report.result
    lines = [f"J = d {esc(r.output)} / d {esc(r.wrt)}: {r.m} x {r.n}{' (square)' if r.square else ''}, "
             f"{esc(r.dtype)}; {len(r.points)} input(s) ({esc(r.source_detail)}). Singular: sigma_min at or below "
             + ("the numerical rank tolerance" if r.threshold is None else num(r.threshold)) + ".", ""]
    cols = ["input", "sigma_max", "sigma_min", "rank", "cond"] + (["det", "log\\|det\\|"] if r.square else
                                                                  ["manipulability"])
    cols += (["logdet discrepancy", "log p(x)"] if r.logdet_output else []) + ["singular"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    shown = r.points if len(r.points) <= 40 else r.points[:20] + r.points[-20:]
    for p in shown:
        row = [esc(p.label), num(p.sigma_max), num(p.sigma_min), num(p.rank), num(p.condition_number)]
        row += [num(p.det), num(p.logdet)] if r.square else [num(p.manipulability)]
        row += [num(p.logdet_discrepancy), num(p.log_density)] if r.logdet_output else []
        row.append("?" if p.singular is None else ("**yes**" if p.singular else "no"))
        lines.append("| " + " | ".join(row) + " |")
    if len(r.points) > 40:
        lines.append(f"\n({len(r.points) - 40} inputs not shown; see report.json)")
    for c in r.crossings:
        lines += ["", f"- singular input between {esc(r.points[c.between[0]].label)} and "
                      f"{esc(r.points[c.between[1]].label)}" + (f" at t = {c.t:.10g}" if c.t is not None else "")
                  + (f": {esc([round(v, 10) for v in c.input])}" if c.input else "")
                  + f" (sigma_min {num(c.sigma_min, 3)})"]
    return lines
