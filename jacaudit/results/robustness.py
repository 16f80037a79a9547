"""Result of ``jacaudit robustness``: FGSM/PGD probes over an epsilon sweep, minimal flipping epsilons, Jacobian
norms and adversarial sensitivity directions, gradient-masking findings."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from . import Image, result_type


@dataclass(frozen=True)
class SweepPoint:
    """One attack at one epsilon, aggregated over the inputs."""

    attack: Literal["fgsm", "pgd-linf", "pgd-l2"]
    eps: float = field(metadata={"doc": "perturbation budget in the attack space's units (L-inf, or L2 for "
                                        "pgd-l2)"})
    robust_accuracy: float = field(metadata={"doc": "share of inputs still classified as their label"})
    flip_rate: float = field(metadata={"doc": "share of inputs whose predicted class changed"})
    mean_margin_drop: float = field(metadata={"doc": "mean of margin(clean) - margin(adversarial); margin = label "
                                                     "score minus the best other score"})
    worst_margin_drop: float
    predicted_margin_change: float | None = field(default=None, metadata={
        "doc": "FGSM: mean first-order prediction of the margin change, grad(margin) . delta"})
    actual_margin_change: float | None = field(default=None, metadata={
        "doc": "mean actual margin change, margin(adversarial) - margin(clean)"})
    linearization_error: float | None = field(default=None, metadata={
        "doc": "FGSM: mean |actual - predicted| / mean |predicted| (0: the model is linear at this scale)"})
    max_output_ratio: float | None = field(default=None, metadata={
        "doc": "largest ||f(x') - f(x)||_2 / ||x' - x||_2 over the inputs (an observed local Lipschitz ratio)"})


@dataclass(frozen=True)
class FlipEpsilons:
    """Minimal flipping epsilon per input (PGD L-inf, bisection between sweep points)."""

    values: list[float | None] = field(metadata={
        "doc": "per input (in input order): the smallest epsilon found to flip it (an upper bound within the "
               "bisection tolerance); 0 when misclassified clean; None when no epsilon of the sweep flips it"})
    median: float | None
    never_flipped: int = field(metadata={"doc": "inputs no epsilon of the sweep flipped"})
    misclassified: int = field(metadata={"doc": "inputs misclassified without perturbation (epsilon 0)"})
    bisection_steps: int
    histogram_edges: list[float]
    histogram_counts: list[int]


@dataclass(frozen=True)
class NormSummary:
    """Jacobian of the scores w.r.t. the input (attack units) per input, and their distribution."""

    inputs_measured: int
    frobenius_method: str = field(metadata={"doc": "exact (few outputs) or hutchinson (random probes)"})
    frobenius_probes: int
    frobenius: dict[str, float] = field(metadata={"doc": "||J||_F over the inputs: mean, median, p95, max"})
    frobenius_stderr_mean: float = field(metadata={"doc": "mean standard error of the Hutchinson estimates"})
    frobenius_sq_mean: float = field(metadata={"doc": "mean ||J||_F^2: what a Jacobian regulariser (Hoffman et "
                                                      "al. 2019) penalises"})
    spectral: dict[str, float] = field(metadata={"doc": "||J||_2 (largest singular value) over the inputs: mean, "
                                                        "median, p95, max; the local Lipschitz estimate (L2)"})
    spectral_converged: int = field(metadata={"doc": "inputs whose subspace iteration converged"})
    observed_ratio_max: float | None = field(metadata={
        "doc": "largest ||f(x') - f(x)|| / ||x' - x|| seen under the probes"})
    matvecs: int = field(metadata={"doc": "jvp + vjp passes spent on the singular vectors"})
    histogram_edges: list[float] = field(default_factory=list, metadata={"doc": "of the spectral norms"})
    histogram_counts: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class InputRobustness:
    name: str
    source: str
    label: int
    label_name: str | None
    predicted: int
    margin: float = field(metadata={"doc": "clean margin: label score minus the best other score"})
    fgsm_flip_eps: float | None = field(metadata={"doc": "smallest sweep epsilon at which FGSM flips it"})
    pgd_flip_eps: float | None = field(metadata={"doc": "minimal flipping epsilon (PGD L-inf, bisection)"})
    gradient_norm: float = field(metadata={"doc": "||grad of the loss|| (L2) at the clean input"})
    frobenius: float | None = None
    frobenius_stderr: float | None = None
    spectral: float | None = None
    singular_values: list[float] = field(default_factory=list)
    cos_fgsm_top: float | None = field(default=None, metadata={
        "doc": "|cos| between the FGSM direction sign(grad) and the top right singular vector"})
    cos_grad_top: float | None = field(default=None, metadata={
        "doc": "|cos| between the loss gradient and the top right singular vector"})


@dataclass(frozen=True)
class AdversarialExample:
    """An input with its strongest perturbation in the sweep (for the worst inputs)."""

    name: str
    attack: str
    eps: float
    label_name: str
    clean_prediction: str
    adversarial_prediction: str
    original: Image | None
    perturbation: Image | None = field(metadata={"doc": "delta, amplified to the full display range"})
    adversarial: Image | None
    npy: str | None = field(default=None, metadata={"doc": "the adversarial input in attack units (.npy)"})


@dataclass(frozen=True)
class Direction:
    """A right singular vector of J at one input: the input direction the scores are most sensitive to."""

    input: str
    rank: int
    singular_value: float
    image: Image | None
    npy: str | None = None


@dataclass(frozen=True)
class MaskingFinding:
    """A gradient-masking symptom (AutoAttack's / Carlini et al.'s checklists) and its evidence."""

    name: str
    flagged: bool
    evidence: str


@dataclass(frozen=True)
class FailedInput:
    path: str
    error: str


@result_type("robustness")
@dataclass(frozen=True)
class RobustnessResult:
    """How easily the model's predictions break under small input perturbations, over a dataset."""

    input_name: str
    score_tensor: str
    score: Literal["logit", "log-probability", "output"] = field(metadata={
        "doc": "what is attacked: logits (the Softmax input when there is one), the log of probability outputs, "
               "or the raw output"})
    labels_source: str
    classes: list[str] | None
    n_inputs: int
    n_total: int = field(metadata={"doc": "samples in the data before --limit"})
    clean_accuracy: float
    units: str = field(metadata={"doc": "the attack space: what epsilon is measured in"})
    range: list[float] = field(metadata={"doc": "[lo, hi] every perturbed input is clipped to (attack units)"})
    range_source: str
    eps: list[float]
    eps_l2: list[float] | None
    pgd: dict[str, Any] = field(metadata={"doc": "steps, step size rule, random start, norms, restarts"})
    sweep: list[SweepPoint]
    flip_eps: FlipEpsilons | None
    norms: NormSummary | None
    inputs: list[InputRobustness]
    examples: list[AdversarialExample]
    directions: list[Direction]
    masking: list[MaskingFinding]
    failures: list[FailedInput]
    input_kind: Literal["image", "features", "tensor"] = "image"
