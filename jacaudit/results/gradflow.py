"""Result of ``jacaudit gradflow``: how the output's sensitivity travels through depth along the main path of the
graph -- ||dy/dh_l|| per depth, the spectral norms of the per-block Jacobians dh_{l+1}/dh_l and their running
product."""
from __future__ import annotations

from dataclasses import dataclass, field

from . import result_type


@dataclass(frozen=True)
class GradflowDepth:
    """One tensor h_l on the main path (depth 0: the model input)."""

    depth: int
    tensor: str
    shape: list[int]
    grad_norm: float | None = field(metadata={"doc": "||dy/dh_l||_F, the Frobenius norm of the Jacobian of the "
                                                     "output with respect to this tensor"})
    grad_stderr: float = field(metadata={"doc": "standard error of grad_norm (0 when exact)"})
    grad_method: str = field(metadata={"doc": "exact (one vjp per output element) or hutchinson (random probes)"})
    ratio: float | None = field(metadata={"doc": "grad_norm / grad_norm at the last depth"})
    activation_norm: float = field(metadata={"doc": "||h_l||_F at the input"})


@dataclass(frozen=True)
class GradflowBlock:
    """The block from one main-path tensor to the next (the last block ends at the output)."""

    index: int
    source: str
    target: str
    spectral_norm: float | None = field(metadata={"doc": "||dh_{l+1}/dh_l||_2 by power iteration (jvp + vjp)"})
    residual: float | None = field(metadata={"doc": "power iteration residual ||J^T u - s v|| / s"})
    converged: bool
    iterations: int
    running_product: float | None = field(metadata={
        "doc": "product of the spectral norms of the blocks up to this one: an upper bound on ||dh_{l+1}/dx||_2"})


@result_type("gradflow")
@dataclass(frozen=True)
class GradflowResult:
    """Sensitivity through depth: d output / d h_l along the main path h_0 = input, h_1, ..., h_L."""

    input_name: str
    output: str
    output_shape: list[int]
    input_source: str
    synthetic_input: bool
    layer_selection: str = field(metadata={"doc": "how the main-path tensors were chosen"})
    main_path: int = field(metadata={"doc": "main-path tensors found (before any subsampling); 0 when named"})
    depths: list[GradflowDepth]
    blocks: list[GradflowBlock]
    vanishing_ratio: float | None = field(metadata={
        "doc": "the smallest ratio ||dy/dh_l|| / ||dy/dh_L|| over the depths (small: the sensitivity vanishes "
               "towards the input)"})
    exploding_ratio: float | None = field(metadata={
        "doc": "the largest such ratio (large: the sensitivity explodes towards the input)"})
    dtype: str
    device: str
    logits: bool = False
    log10_grad: list[float | None] = field(default_factory=list, metadata={"doc": "plot series: log10 grad_norm"})
    log10_block: list[float | None] = field(default_factory=list, metadata={
        "doc": "plot series: log10 of the block spectral norms"})
    log10_product: list[float | None] = field(default_factory=list, metadata={
        "doc": "plot series: log10 of the running product"})


def markdown_lines(report) -> list[str]:
    """The Markdown section of a gradflow report (registered in ``report/formats/markdown.py``'s ``SECTIONS``)."""
    from ..report.formats.markdown import esc, num

    r = report.result
    lines = [f"y = {esc(r.output)}; main path {esc(r.layer_selection)}. Vanishing ratio {num(r.vanishing_ratio, 3)}, "
             f"exploding ratio {num(r.exploding_ratio, 3)} (min / max of \\|\\|dy/dh\\_l\\|\\| / \\|\\|dy/dh\\_L\\|\\|).",
             "", "| depth | tensor | \\|\\|dy/dh\\|\\| | ratio | block norm | running product |",
             "|---:|---|---:|---:|---:|---:|"]
    for d, b in zip(r.depths, r.blocks):
        lines.append(f"| {d.depth} | {esc(d.tensor)} | {num(d.grad_norm, 3)} | {num(d.ratio, 3)} | "
                     f"{num(b.spectral_norm, 3)}{'' if b.converged else ' (not converged)'} | "
                     f"{num(b.running_product, 3)} |")
    return lines
