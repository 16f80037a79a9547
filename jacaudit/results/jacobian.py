"""Result of ``jacaudit jacobian``: the full Jacobian's summary (shapes, norms, rank, largest entries), how it was
computed, and optionally the local linearity table."""
from __future__ import annotations

from dataclasses import dataclass, field

from . import result_type


@dataclass(frozen=True)
class JacobianEntry:
    """One entry of J, located by its output index and its input index (batch axis included)."""

    output_index: list[int]
    input_index: list[int]
    value: float


@dataclass(frozen=True)
class JacobianComputation:
    """How J was computed."""

    mode: str = field(metadata={"doc": "the mode that ran: reverse (vjp rows) or forward (jvp columns)"})
    path: str = field(metadata={"doc": "vmap, batched or loop"})
    dtype: str
    device: str
    chunk_size: int
    chunks: int
    oom_retries: int = 0
    bytes: int = field(default=0, metadata={"doc": "size of J in bytes"})
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FrobeniusNorm:
    value: float
    method: str = field(metadata={"doc": "exact (from J) or hutchinson (random probes)"})
    stderr: float | None = field(default=None, metadata={"doc": "standard error of an estimate (0 when exact)"})
    probes: int | None = None


@dataclass(frozen=True)
class SpectralNorm:
    value: float | None
    method: str = field(metadata={"doc": "svd (exact), power-iteration (estimate), or none (not computed)"})
    converged: bool | None = field(default=None, metadata={"doc": "power iteration: the residual test passed"})
    iterations: int | None = None
    residual: float | None = field(default=None, metadata={"doc": "power iteration: ||J^T u - s v|| / s"})


@dataclass(frozen=True)
class SingularValue:
    """A top singular value of J estimated by block power iteration (J never materialised)."""

    value: float
    residual: float = field(metadata={"doc": "||J^T u_i - s_i v_i|| / s_1"})


@dataclass(frozen=True)
class JacobianLinearityRow:
    direction: str = field(metadata={"doc": "random-k or singular-k (top right-singular direction of J)"})
    step: float = field(metadata={"doc": "relative step ||D|| / ||x||"})
    error: float = field(metadata={"doc": "||f(x+D) - f(x) - J D|| / ||f(x+D) - f(x)||"})


@dataclass(frozen=True)
class JacobianLinearity:
    """How far the first-order model f(x) + J D holds."""

    steps: list[float]
    rows: list[JacobianLinearityRow]
    worst_by_step: list[JacobianLinearityRow] = field(
        metadata={"doc": "the largest error at each step (direction: the one where it occurs)"})


@result_type("jacobian")
@dataclass(frozen=True)
class JacobianResult:
    """The full Jacobian J = d output / d wrt at one input (shape: output shape + input shape)."""

    input_name: str = field(metadata={"doc": "the model input the input file (or synthetic values) fed"})
    wrt: str = field(metadata={"doc": "the tensor differentiated with respect to (an input or an internal tensor)"})
    output: str = field(metadata={"doc": "the tensor differentiated"})
    input_shape: list[int]
    output_shape: list[int]
    jacobian_shape: list[int]
    requested_mode: str = field(metadata={"doc": "--mode as given: auto, reverse or forward"})
    computation: JacobianComputation
    frobenius: FrobeniusNorm
    spectral: SpectralNorm
    rank: int | None = field(metadata={"doc": "number of singular values above rank_tol (None: not computed)"})
    rank_tol: float | None
    largest: list[JacobianEntry] = field(metadata={"doc": "the entries of largest magnitude, largest first"})
    finite: bool
    input_source: str = field(metadata={"doc": "the input file, or 'synthetic'"})
    synthetic_input: bool = field(metadata={"doc": "the input was seeded random values, not data"})
    logits: bool = field(metadata={"doc": "the pre-softmax logits were differentiated (--logits)"})
    softmax_warning: str | None = field(
        default=None, metadata={"doc": "set when the differentiated output comes out of a Softmax"})
    linearity: JacobianLinearity | None = None
    saved: str | None = field(default=None, metadata={"doc": "the .npy file J was saved to (--save)"})
    matrix: list[list[float]] | None = field(default=None, metadata={
        "doc": "J as an (outputs x inputs) matrix when small (at most 64 x 64 entries), else None"})
    singular_values: list[float] | None = field(default=None, metadata={
        "doc": "all singular values of J, largest first, when J is small enough for an SVD (else None)"})
    top_singular: list[SingularValue] | None = field(default=None, metadata={
        "doc": "top-k singular values by block power iteration (top-k estimator), largest first"})
    estimated: bool = field(default=False, metadata={
        "doc": "J was not materialised: only estimators ran (Hutchinson Frobenius norm, power iteration)"})
