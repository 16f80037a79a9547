"""Result of ``jacaudit saliency``: attribution maps per input and method, plus the optional sanity check."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from . import Image, result_type


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str | None
    score: float = field(metadata={"doc": "the value of the scored tensor (logit when available)"})
    probability: float | None = field(default=None, metadata={"doc": "softmax probability, when known"})
    coords: list[int] | None = field(default=None, metadata={
        "doc": "the element's coordinates in the scored output (after the batch axis); None for a sum"})


@dataclass(frozen=True)
class Attributed:
    """One feature / sequence position of a non-image input and its attribution."""

    index: int
    name: str
    value: float = field(metadata={"doc": "signed attribution (a sequence position: summed over the embedding "
                                          "dim)"})
    magnitude: float = field(metadata={"doc": "|attribution| (a sequence position: the channel reduction over "
                                              "the embedding dim); the ranking is by this"})
    share: float = field(metadata={"doc": "magnitude / sum of all magnitudes"})


@dataclass(frozen=True)
class Concentration:
    """Where the saliency mass (the reduced, non-negative map) lies in the image."""

    centroid_x: float = field(metadata={"doc": "mass centroid, fraction of the width (0 left, 1 right)"})
    centroid_y: float = field(metadata={"doc": "mass centroid, fraction of the height (0 top, 1 bottom)"})
    region: str = field(metadata={"doc": "where the densest window (1/8 of the side) of the map lies, as words: "
                                         "upper-left ... centre ... lower-right"})
    top10_mass: float = field(metadata={"doc": "share of the mass in the 10% most salient pixels"})
    area50: float = field(metadata={"doc": "smallest share of the pixels holding half of the mass"})
    bbox50: list[int] = field(metadata={"doc": "[x0, y0, x1, y1] (exclusive end) around those pixels"})


@dataclass(frozen=True)
class MethodMap:
    method: str
    heatmap: Image
    overlay: Image | None
    npy: str | None = field(metadata={"doc": "raw signed attribution in the model input's shape (.npy)"})
    concentration: Concentration | None = field(metadata={
        "doc": "where the mass lies in the image; None for a non-image input (see ranking)"})
    total: float = field(metadata={"doc": "sum of the signed attribution"})
    completeness_gap: float | None = field(
        default=None, metadata={"doc": "IG only: |sum(attr) - (F(x) - F(baseline))| / |F(x) - F(baseline)|"})
    f_x: float | None = None
    f_baseline: float | None = None
    mask_fraction: float | None = field(
        default=None, metadata={"doc": "share of the saliency mass inside the given object mask"})
    heat_max: float | None = field(default=None, metadata={
        "doc": "the map value at the top of the heatmap's colour scale (the bottom is 0)"})
    mask_outlined: bool = field(default=False, metadata={"doc": "the overlay outlines the object mask"})
    ranking: list[Attributed] | None = field(default=None, metadata={
        "doc": "non-image inputs: the features / positions by attribution magnitude, largest first"})
    zero_fraction: float | None = field(default=None, metadata={
        "doc": "share of the input's elements whose attribution is exactly 0 (1: the map is empty)"})


@dataclass(frozen=True)
class InputSaliency:
    name: str
    source: str
    synthetic: bool
    top: list[ClassScore] = field(metadata={"doc": "the highest-scoring classes, best first"})
    target: ClassScore
    thumbnail: Image | None
    maps: list[MethodMap]
    target_coords: list[int] | None = field(default=None, metadata={
        "doc": "the explained element in the scored output's coordinates (after the batch axis); None for a sum"})
    target_region: str | None = field(default=None, metadata={
        "doc": "a sum target: the summed slice, e.g. [4, 0:2100]"})


@dataclass(frozen=True)
class FailedInput:
    path: str
    error: str


@dataclass(frozen=True)
class SanityStep:
    randomized: list[str] = field(metadata={"doc": "parameter tensors randomised so far (cascading from the top)"})
    spearman: float = field(metadata={"doc": "rank correlation of |map| with the original, mean over inputs"})
    status: str = field(default="ok", metadata={"doc": "ok, or failed (the maps could not be computed at this "
                                                       "step: see message; spearman is NaN)"})
    message: str | None = None


@dataclass(frozen=True)
class SanityCheck:
    """Model-parameter randomisation test (Adebayo et al. 2018) for one method."""

    method: str
    steps: list[SanityStep]
    final_spearman: float
    threshold: float
    flagged: bool = field(metadata={"doc": "true when the map barely changes (final |rho| >= threshold)"})
    status: str = field(default="checked", metadata={
        "doc": "checked (the whole cascade ran), partial (some steps failed), error (the last step failed: no "
               "final value), skipped (nothing could be randomised: no evidence)"})
    reason: str | None = field(default=None, metadata={"doc": "why it is skipped / partial / error"})


@result_type("saliency")
@dataclass(frozen=True)
class SaliencyResult:
    """Attribution maps of a classifier's target score with respect to its input."""

    methods: list[str]
    target: str = field(metadata={"doc": "the requested target: top1, a class index or a label"})
    score: Literal["logit", "probability", "output"] = field(
        metadata={"doc": "which tensor was differentiated: pre-softmax logit, probability, or the raw output"})
    score_tensor: str
    reduction: Literal["max-abs", "l2"] = field(
        metadata={"doc": "how channels are reduced for heatmaps and statistics"})
    input_name: str
    preprocess: dict[str, Any] | None
    ig_baseline: str | None
    ig_steps: int | None
    smoothgrad_samples: int | None
    smoothgrad_sigma: float | None = field(metadata={"doc": "noise sigma as a fraction of the input range"})
    inputs: list[InputSaliency]
    failures: list[FailedInput]
    sanity: list[SanityCheck]
    target_spec: str = field(default="class", metadata={
        "doc": "how the explained scalar is chosen: class (an index into a (batch, classes) output: top1 or "
               "a given class), index=I,J (one element), argmax=SLICE, sum=SLICE (output coordinates)"})
    output_shape: list[int] | None = field(default=None, metadata={
        "doc": "the scored tensor's shape after the batch axis"})
    input_kind: Literal["image", "features", "sequence", "tensor"] = field(default="image", metadata={
        "doc": "how maps are summarised: image (2-D maps, regions), features (rank-2 input: a per-feature "
               "ranking), sequence (rank-3: a per-position ranking, reduced over the last dim), tensor (other)"})
    wrt: str | None = field(default=None, metadata={
        "doc": "an internal tensor differentiated instead of the input (e.g. an embedding's output)"})
