"""Result of ``jacaudit verify``: forward fidelity against onnxruntime, J v against central differences per
direction, the adjoint (u^T J v) consistency, the tolerances used and the verdict."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from . import result_type


@dataclass(frozen=True)
class VerifyForward:
    """The interpreter's forward against the reference's on the same input."""

    reference: str = field(metadata={"doc": "onnxruntime, or none (no reference forward for this format)"})
    max_abs: float | None = field(metadata={"doc": "max |engine - reference|"})
    max_rel: float | None = field(metadata={"doc": "max |engine - reference| / max |reference|"})
    tol: float | None
    passed: bool
    note: str = ""
    atol: float | None = field(default=None, metadata={
        "doc": "absolute floor: max|engine - reference| below it passes (64 ulps of the reference's dtype at "
               "max(1, max|reference|))"})
    judged_error: float | None = field(default=None, metadata={
        "doc": "max|engine - reference| / max(max|reference|, atol / tol): the value judged against tol"})


@dataclass(frozen=True)
class VerifyDirection:
    """J v from jvp against central differences (Richardson-extrapolated) along one seeded random direction."""

    index: int
    reference: str = field(metadata={"doc": "onnxruntime or model-float64 (the model itself in float64)"})
    status: str = field(metadata={"doc": "pass, fail, non-differentiable (kinks: reported, not failed) or "
                                         "inconclusive"})
    non_differentiable: bool
    rel_error: float = field(metadata={"doc": "||Jv - FD|| / max(||Jv||, ||FD||)"})
    tol: float = field(metadata={"doc": "relative tolerance used (rtol + the differences' own error)"})
    jvp_norm: float = field(metadata={"doc": "||J v|| from the engine's jvp"})
    fd_norm: float = field(metadata={"doc": "||FD||, the extrapolated central difference"})
    fd_spread: float = field(metadata={"doc": "relative spread of the extrapolated slopes across steps"})
    steps: list[float] = field(metadata={"doc": "the finite-difference step sizes h"})
    slope_norms: list[float] = field(metadata={"doc": "||(f(x+hv) - f(x-hv)) / 2h|| at each step"})
    note: str = ""
    retry_of: int | None = field(default=None, metadata={
        "doc": "the direction this one retries (a zero, non-smooth or rounding-level direction gave no evidence)"})
    point: str = field(default="x", metadata={"doc": "x, or 'nearby' (x + a small seeded offset: x sits on a kink)"})
    confirm_steps: list[float] = field(default_factory=list, metadata={
        "doc": "the second step series that a disagreement was re-checked at (a fail must reproduce there)"})


@dataclass(frozen=True)
class VerifyAdjoint:
    """u^T (J v) from jvp against (u^T J) v from vjp, over the same directions."""

    max_rel_error: float = field(metadata={"doc": "over the directions judged (not those at rounding level)"})
    tol: float = field(metadata={"doc": "the tolerance used (the base, or raised to the rounding measured)"})
    passed: bool
    status: str = field(default="", metadata={
        "doc": "pass, fail, or skipped (every direction's jvp/vjp at its rounding level: no evidence)"})
    note: str = ""
    rounding_residual: float | None = field(default=None, metadata={
        "doc": "largest linearity residual ||A(a+b) - Aa - Ab|| / (||Aa|| + ||Ab||) of jvp/vjp measured"})


@dataclass(frozen=True)
class VerifyOrtBackward:
    """onnxruntime's backward graph (``--runtime auto|onnxruntime``) against the torch interpreter's autograd:
    the VJP u^T J for a few seeded random cotangents u, both in float32 (schema 1.2)."""

    status: Literal["pass", "fail", "inconclusive"] = field(metadata={
        "doc": "inconclusive: the interpreter's VJP is zero or not finite for every cotangent (no evidence)"})
    max_rel_error: float | None = field(metadata={
        "doc": "max over cotangents of max|g_onnxruntime - g_torch| / max|g_torch|"})
    tol: float = field(metadata={"doc": "relative tolerance (float32 terms, of max|g_torch|)"})
    cotangents: int
    backward_nodes: int = field(metadata={"doc": "nodes of the ONNX backward graph (a torch island counting as one)"})
    note: str = ""


@dataclass(frozen=True)
class VerifyTolerances:
    forward: float | None = field(metadata={"doc": "bound on max|engine - onnxruntime| / max|onnxruntime|"})
    rtol: float | None = field(metadata={"doc": "--rtol as given (None: the default by the reference's dtype)"})
    default_rtol: dict[str, float] = field(metadata={"doc": "default derivative rtol by the reference's dtype"})
    adjoint: float
    float32_engine_rtol: float | None = field(
        metadata={"doc": "floor on the tolerance when the engine runs in float32"})
    nondiff_spread: float | None = field(
        default=None, metadata={"doc": "slope spread above which a direction counts as non-differentiable"})
    nondiff_ratio: float | None = field(
        default=None, metadata={"doc": "slope ratio across steps that marks a piecewise-constant graph"})
    cap: float | None = field(default=None, metadata={"doc": "no pass is granted at a wider relative tolerance"})
    forward_atol: float | None = field(default=None, metadata={"doc": "absolute floor of the forward check"})
    rounding_residual: float | None = field(default=None, metadata={
        "doc": "jvp/vjp linearity residual above which a derivative counts as rounding noise"})


@result_type("verify")
@dataclass(frozen=True)
class VerifyResult:
    """Are the engine's derivatives (and the interpreter's forward) right, against references that share no code
    with it?"""

    verdict: Literal["pass", "fail", "inconclusive"] = field(metadata={
        "doc": "inconclusive: no direction gave evidence (kinks, zero derivatives, loose tolerances)"})
    input_name: str
    wrt: str = field(metadata={"doc": "the tensor differentiated with respect to"})
    output: str
    reference: str = field(metadata={"doc": "onnxruntime (ONNX) or model-float64 (TorchScript, callables)"})
    dtype: str = field(metadata={"doc": "the engine's dtype"})
    device: str
    directions_requested: int
    forward: VerifyForward
    directions: list[VerifyDirection]
    adjoint: VerifyAdjoint
    tolerances: VerifyTolerances
    non_differentiable: int = field(metadata={"doc": "directions that cross non-differentiable points"})
    fd_steps: int = field(metadata={"doc": "step sizes per finite difference (halving)"})
    logits: bool
    input_source: str = field(default="tensor", metadata={"doc": "the input file, 'synthetic', or 'tensor' (API)"})
    synthetic_input: bool = False
    softmax_warning: str | None = None
    retries: int = field(default=0, metadata={"doc": "extra directions/points tried when one gave no evidence"})
    retry_budget: int = 0
    warnings: list[str] = field(default_factory=list, metadata={"doc": "what the check itself noticed"})
    ort_backward: VerifyOrtBackward | None = field(default=None, metadata={
        "doc": "onnxruntime's input-gradient VJP against the interpreter's; null where the runtime is torch or "
               "onnxruntime has no backward plan for this input"})

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"
