"""Result of ``jacaudit transfer``: per-feature Jacobian sensitivity scores that say which learned features carry
over to new data -- input features (global sensitivity), intermediate features of named layers (normalised
sensitivity, influence on the head, a verdict), and with target data the shift per feature and per layer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from . import result_type

Verdict = Literal["reusable", "over-specialised", "dead"]


@dataclass(frozen=True)
class InputFeature:
    """Global sensitivity of the scores to one input feature (a column, or an image channel), over a dataset."""

    name: str
    index: int
    std: float = field(metadata={"doc": "std of the feature's values over the data (and its elements)"})
    mean_abs_gradient: float = field(metadata={
        "doc": "aggregated over the outputs: mean over samples (and the feature's elements) of the L2 norm over the "
               "outputs of dy/dx_j"})
    scaled: float = field(metadata={"doc": "mean_abs_gradient x std: the scale-free score the ranking uses"})
    per_output: list[float] = field(metadata={"doc": "mean |dy_k/dx_j| per output k (outputs in order)"})
    per_output_scaled: list[float] = field(metadata={"doc": "per_output x std"})
    rank: int = field(metadata={"doc": "1 = the most influential by the scaled score"})


@dataclass(frozen=True)
class InputSensitivity:
    kind: Literal["features", "channels"] = field(metadata={
        "doc": "features: the columns of a (batch, features) input; channels: one score per channel (axis 1, or "
               "the image's channel axis) with its elements pooled"})
    outputs: list[str] = field(metadata={"doc": "the outputs differentiated (class names or indices)"})
    outputs_rule: str = field(metadata={"doc": "which outputs were differentiated and why"})
    method: str = field(metadata={"doc": "exact per-sample gradients (one reverse pass per output per batch)"})
    n_inputs: int
    features: list[InputFeature] = field(metadata={"doc": "ranked, the most influential (scaled) first"})
    ranking_raw: list[str] = field(metadata={"doc": "feature names by mean_abs_gradient (not scale-free)"})


@dataclass(frozen=True)
class FeatureScore:
    """One feature k (a channel of an (N, C, ...) tensor or a unit of an (N, C) one) of a layer, on one dataset."""

    index: int
    mean: float = field(metadata={"doc": "mean of the feature's activations over the data (and its elements)"})
    std: float = field(metadata={"doc": "std of the feature's activations over the data (and its elements)"})
    gradient_rms: float = field(metadata={
        "doc": "sqrt(E_x ||dh_k/dx||_F^2 / m_k): the RMS input-gradient norm per element of the feature (m_k "
               "elements), in feature units per input unit"})
    gradient_rms_stderr: float = field(metadata={"doc": "standard error of gradient_rms (0 when exact)"})
    sensitivity: float | None = field(metadata={
        "doc": "normalised sensitivity gradient_rms x sigma_x / std: the RMS first-order change of the feature "
               "under isotropic input noise of the data's per-element spread sigma_x, in units of the feature's "
               "own spread; 1 = a linear feature of isotropic data; None when dead"})
    sensitivity_stderr: float | None
    influence: float = field(metadata={
        "doc": "E_x sum over the feature's elements of |dy/dh_k| (y: the predicted class's score, h_k overridden)"})
    influence_scaled: float = field(metadata={"doc": "influence x std: the score change when the feature moves by "
                                                     "its own spread"})
    verdict: Verdict
    borderline: bool = field(metadata={"doc": "the sensitivity is within 2 standard errors of the threshold"})
    reason: str = ""


@dataclass(frozen=True)
class LayerScores:
    """A layer's features on one dataset, and their verdicts."""

    data: Literal["source", "target"]
    n_inputs: int
    input_scale: float = field(metadata={"doc": "sigma_x: sqrt of the mean per-element variance of the input over "
                                                "this data (tr Cov(x) / n)"})
    features: list[FeatureScore]
    reusable_fraction: float
    overspecialised_fraction: float
    dead_fraction: float
    overspecialised_influence_share: float | None = field(metadata={
        "doc": "share of the layer's scaled influence carried by over-specialised features"})
    sensitivity_median: float | None
    sensitivity_p90: float | None


@dataclass(frozen=True)
class FeatureShift:
    index: int
    mean_shift: float = field(metadata={"doc": "(mean_target - mean_source) / std_source"})
    std_log_ratio: float | None = field(metadata={"doc": "ln(std_target / std_source)"})
    sensitivity_log_ratio: float | None = field(metadata={"doc": "ln(sensitivity_target / sensitivity_source)"})
    shift: float = field(metadata={"doc": "max of |mean_shift|, |std_log_ratio|, |sensitivity_log_ratio|"})
    verdict_source: Verdict
    verdict_target: Verdict


@dataclass(frozen=True)
class LayerShift:
    features: list[FeatureShift] = field(metadata={"doc": "every feature, the most shifted first"})
    median_shift: float
    max_shift: float
    shifted_fraction: float = field(metadata={"doc": "share of the features whose shift exceeds the threshold"})
    verdict_changes: int
    newly_overspecialised: int = field(metadata={"doc": "reusable on the source, over-specialised on the target"})


@dataclass(frozen=True)
class LayerResult:
    tensor: str
    shape: list[int] = field(metadata={"doc": "the tensor's shape without the batch axis"})
    feature_axis: int = field(metadata={"doc": "axis of the features (counting the batch axis as 0)"})
    n_features: int
    elements_per_feature: int
    method: Literal["exact", "exact per unit", "hutchinson"] = field(metadata={
        "doc": "exact: one jvp per input basis vector (the input is small); exact per unit: one vjp per unit of an "
               "(N, C) layer; hutchinson: Rademacher input probes, one jvp each gives every feature at once"})
    probes: int = field(metadata={"doc": "passes per batch: jvps (exact, hutchinson) or vjps (exact per unit)"})
    source: LayerScores
    target: LayerScores | None
    shift: LayerShift | None
    summary: str
    suggestion: Literal["freeze", "fine-tune (low learning rate)", "fine-tune", "re-train"]
    suggestion_reason: str


@dataclass(frozen=True)
class VerdictRule:
    text: str
    overspecialised_above: float = field(metadata={"doc": "sensitivity above it: over-specialised"})
    dead_tolerance: float = field(metadata={"doc": "relative: std or gradient below it times the layer's scale"})
    shift_above: float = field(metadata={"doc": "a feature whose shift exceeds it counts as shifted"})
    freeze_reusable: float = field(metadata={"doc": "freeze when at least this share of the live features is "
                                                    "reusable (and, with target data, few shifted)"})
    finetune_overspecialised: float = field(metadata={"doc": "fine-tune when at least this share is "
                                                             "over-specialised or shifted"})
    retrain_dead: float = field(metadata={"doc": "re-train (re-initialise) when at least this share is dead"})


@dataclass(frozen=True)
class EstimatorNote:
    method: str
    probes: int
    description: str


@dataclass(frozen=True)
class AttentionRow:
    """One sample's per-input-position influence on its predicted class's score."""

    sample: str
    tokens: list[int] | None = field(metadata={"doc": "the token ids when the model input is one id per position"})
    influence: list[float] = field(metadata={"doc": "||dy/de[t]||_2 over the features, per input position t"})
    top_positions: list[int] = field(metadata={"doc": "the two positions of largest influence"})
    predicted: int


@dataclass(frozen=True)
class AttentionMaps:
    """Implicit attention through the Jacobian, w.r.t. a [batch, positions, features] tensor e."""

    wrt: str
    out_tensor: str | None
    n_inputs: int
    positions_in: int
    positions_out: int | None
    influence_mean: list[float] = field(metadata={"doc": "mean over the samples of ||dy/de[t]|| per position"})
    influence_share_mean: list[float] = field(metadata={
        "doc": "mean over the samples of each position's share of the sample's total influence"})
    rows: list[AttentionRow]
    matrix_mean: list[list[float]] | None = field(metadata={
        "doc": "A[t_out][t_in] = ||dh[t_out]/de[t_in]||_F, mean over the samples (with an output tensor h)"})
    matrix_first: list[list[float]] | None = field(metadata={"doc": "A for the first sample"})
    method: str | None = field(metadata={"doc": "exact (the basis of h's features) or hutchinson"})
    probes: int | None


@result_type("transfer")
@dataclass(frozen=True)
class TransferResult:
    """Which learned features carry over: Jacobian sensitivity per input feature and per intermediate feature."""

    input_name: str
    score_tensor: str
    score: Literal["logit", "output"]
    classes: list[str] | None
    source_data: str
    target_data: str | None
    n_source: int
    n_target: int | None
    input_kind: Literal["features", "image", "tensor"]
    inputs: InputSensitivity | None
    inputs_target: InputSensitivity | None
    layers: list[LayerResult]
    rule: VerdictRule
    estimator: EstimatorNote
    layer_selection: str | None = field(default=None, metadata={
        "doc": "how the layers were found when --layer all was given"})
    attention: AttentionMaps | None = None


def markdown_lines(report) -> list[str]:
    """The Markdown summary section of a transfer report (registered in ``report/formats/markdown.py``'s
    ``SECTIONS``; kept beside the result so the shared format module only holds the registration)."""
    from ..report.formats.markdown import esc, num, pct

    r = report.result
    lines = [f"{r.n_source} source sample(s)" + (f", {r.n_target} target sample(s)" if r.n_target else "")
             + f"; differentiated: {esc(r.score)} {esc(r.score_tensor)} w.r.t. {esc(r.input_name)}.", ""]
    if r.inputs is not None:
        top = r.inputs.features[:10]
        lines += [f"**Input {esc(r.inputs.kind)}** (mean \\|dy/dx\\| x std, source data):", "",
                  "| rank | feature | score | mean \\|dy/dx\\| | std |", "|---:|---|---:|---:|---:|"]
        lines += [f"| {f.rank} | {esc(f.name)} | {num(f.scaled)} | {num(f.mean_abs_gradient)} | {num(f.std)} |"
                  for f in top]
        lines.append("")
    if r.layers:
        tgt = any(lr.target is not None for lr in r.layers)
        lines += [f"**Layers** ({'target' if tgt else 'source'} data; over-specialised: normalised sensitivity > "
                  f"{num(r.rule.overspecialised_above)}):", "",
                  "| layer | features | reusable | over-specialised | dead | median sensitivity | shifted | suggestion |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for lr in r.layers:
            s = lr.target or lr.source
            lines.append(f"| {esc(lr.tensor)} | {lr.n_features} | {pct(s.reusable_fraction)} | "
                         f"{pct(s.overspecialised_fraction)} | {pct(s.dead_fraction)} | {num(s.sensitivity_median, 3)} | "
                         f"{pct(lr.shift.shifted_fraction) if lr.shift else '–'} | {esc(lr.suggestion)} |")
        lines += ["", f"Rule: {esc(r.rule.text)}"]
    a = r.attention
    if a is not None:
        top = sorted(range(a.positions_in), key=lambda t: -a.influence_share_mean[t])[:3]
        hits = ", ".join(f"{esc(row.sample)}: {', '.join(map(str, row.top_positions))}" for row in a.rows[:5])
        lines += ["", f"**Attention maps** w.r.t. {esc(a.wrt)} ({a.positions_in} positions, {a.n_inputs} samples): "
                  f"largest mean share at positions {', '.join(map(str, top))}; top-2 positions per sample: {hits}."]
    return lines
