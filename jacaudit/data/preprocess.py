"""The preprocessing spec: pixels (H x W x C, 0-255) <-> model tensor, both ways.

Forward (``to_tensor``)::

    pixels (H, W, C) float in [0, 255], channels in the spec's order (RGB, BGR or L)
      -> x = pixels / 255            if scale == "0-1"      (unchanged if scale == "0-255")
      -> x = (x - mean) / std        per channel
      -> layout NCHW: (C, H, W)      or NHWC: (H, W, C)     (no batch axis; batching stacks samples)

``from_tensor`` is the exact inverse (used for the "black in pixel space" IG baseline and for overlays).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np

from ..errors import DataError, InputError

LAYOUTS = ("NCHW", "NHWC")
CHANNELS = ("RGB", "BGR", "L")
SCALES = ("0-1", "0-255")
RESIZES = ("stretch", "crop")

#: Named conventions. Each sets scale/mean/std (and channels where the convention fixes it).
PRESETS: dict[str, dict[str, Any]] = {
    # torchvision / ImageNet: RGB in [0, 1], then per-channel standardisation
    "imagenet": {"scale": "0-1", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    # [-1, 1] (Inception, many GANs): (x/255 - 0.5) / 0.5
    "minus1to1": {"scale": "0-1", "mean": (0.5,), "std": (0.5,)},
    # plain [0, 1]
    "unit": {"scale": "0-1", "mean": (0.0,), "std": (1.0,)},
    # raw 0-255 floats
    "raw": {"scale": "0-255", "mean": (0.0,), "std": (1.0,)},
    # Caffe-style VGG/ResNet: BGR, 0-255, mean subtraction only
    "caffe": {"scale": "0-255", "mean": (103.939, 116.779, 123.68), "std": (1.0,), "channels": "BGR"},
}


def parse_floats(text: str | Sequence[float] | None, what: str = "value") -> tuple[float, ...] | None:
    """'0.485,0.456,0.406' -> (0.485, 0.456, 0.406); a sequence passes through; None stays None."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return (float(text),)
    if isinstance(text, str):
        parts = [p for p in text.replace(" ", ",").split(",") if p]
    else:
        parts = list(text)
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise InputError(f"--{what} must be numbers separated by commas, got {text!r}") from None
    if not vals:
        raise InputError(f"--{what} is empty")
    return vals


def parse_size(text: str | int | Sequence[int] | None) -> tuple[int, int] | None:
    """'224' -> (224, 224); '240x320' (H x W) -> (240, 320)."""
    if text is None:
        return None
    if isinstance(text, int):
        vals = [text]
    elif isinstance(text, str):
        try:
            vals = [int(p) for p in text.lower().replace(",", "x").split("x") if p]
        except ValueError:
            raise InputError(f"--size must be N or HxW, got {text!r}") from None
    else:
        vals = [int(v) for v in text]
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 1:
        raise InputError(f"--size must be N or HxW with positive sizes, got {text!r}")
    return (vals[0], vals[1])


@dataclass(frozen=True)
class Preprocess:
    """How image pixels become the model's input tensor (and back).

    ``size`` is (H, W) or None (keep the image's size). ``mean``/``std`` have one value (broadcast) or one
    per channel, in the units after ``scale``. ``resize`` is "stretch" (to size, ignoring aspect) or "crop"
    (shorter side to size, then centre crop). ``dtype`` is the numpy dtype of the tensor.
    """

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: str = "0-1"
    layout: str = "NCHW"
    channels: str = "RGB"
    resize: str = "stretch"
    preset: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise InputError(f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.channels not in CHANNELS:
            raise InputError(f"--channels must be one of {', '.join(CHANNELS)}, got {self.channels!r}")
        if self.scale not in SCALES:
            raise InputError(f"--scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        if self.resize not in RESIZES:
            raise InputError(f"resize must be one of {', '.join(RESIZES)}, got {self.resize!r}")
        for name, v in (("mean", self.mean), ("std", self.std)):
            if len(v) not in (1, self.n_channels):
                raise InputError(f"--{name} has {len(v)} values; the model takes {self.n_channels} channel(s) "
                                 f"({self.channels}): give 1 or {self.n_channels}")
        if any(s == 0 for s in self.std):
            raise InputError("--std must not contain 0")

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def build(cls, preset: str | None = None, **overrides: Any) -> "Preprocess":
        """A spec from a preset name plus explicit overrides (None values are ignored)."""
        fields: dict[str, Any] = {}
        if preset:
            if preset not in PRESETS:
                raise InputError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}")
            fields.update(PRESETS[preset])
            fields["preset"] = preset
        for k, v in overrides.items():
            if v is None:
                continue
            if k in ("mean", "std"):
                v = parse_floats(v, k)
            elif k == "size":
                v = parse_size(v)
            elif k in ("layout", "channels"):
                v = str(v).upper()
            fields[k] = v
        chans = fields.get("channels", "RGB")
        n = 1 if chans == "L" else 3
        # a 3-value preset mean on a grey model: average it (documented)
        for k in ("mean", "std"):
            if k in fields and len(fields[k]) == 3 and n == 1 and k not in {kk for kk, vv in overrides.items()
                                                                               if vv is not None}:
                fields[k] = (float(np.mean(fields[k])),)
        return cls(**fields)

    @classmethod
    def infer(cls, shape: Sequence[Any] | None, preset: str | None = None, **overrides: Any) -> "Preprocess":
        """Defaults from a model input's declared shape, then the preset, then explicit overrides.

        A rank-4 shape whose dim 1 is 1 or 3 is NCHW, else one whose last dim is 1 or 3 is NHWC. Static H, W
        give ``size``; 1 channel gives ``channels="L"``. Unknown shapes keep the image's own size.
        """
        guessed: dict[str, Any] = {}
        if shape is not None and len(shape) == 4:
            dims = [d if isinstance(d, int) and d > 0 else None for d in shape]
            if dims[1] in (1, 3) or (dims[1] is None and dims[3] not in (1, 3)):
                guessed["layout"] = "NCHW"
                c, h, w = dims[1], dims[2], dims[3]
            else:
                guessed["layout"] = "NHWC"
                h, w, c = dims[1], dims[2], dims[3]
            if c == 1:
                guessed["channels"] = "L"
            if h and w:
                guessed["size"] = (h, w)
        merged = {**guessed, **{k: v for k, v in overrides.items() if v is not None}}
        return cls.build(preset, **merged)

    def with_(self, **changes: Any) -> "Preprocess":
        return replace(self, **changes)

    # -- properties ------------------------------------------------------------------------------
    @property
    def n_channels(self) -> int:
        return 1 if self.channels == "L" else 3

    def _vec(self, v: tuple[float, ...]) -> np.ndarray:
        a = np.asarray(v, dtype=np.float64)
        return np.broadcast_to(a, (self.n_channels,)).copy() if a.size == 1 else a

    @property
    def _unit(self) -> float:
        return 255.0 if self.scale == "0-1" else 1.0

    def tensor_shape(self, h: int, w: int) -> tuple[int, ...]:
        c = self.n_channels
        return (c, h, w) if self.layout == "NCHW" else (h, w, c)

    def value_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (low, high) of the tensor when pixels span 0..255 (for noise scales, clipping)."""
        mean, std = self._vec(self.mean), self._vec(self.std)
        lo = (0.0 - mean) / std
        hi = (255.0 / self._unit - mean) / std
        return np.minimum(lo, hi), np.maximum(lo, hi)

    def channel_axis(self) -> int:
        """The channel axis of a batched tensor (N, ...)."""
        return 1 if self.layout == "NCHW" else 3

    # -- the two maps ----------------------------------------------------------------------------
    def to_tensor(self, pixels: np.ndarray) -> np.ndarray:
        """(H, W, C) or (H, W) pixels in 0..255 (spec's channel order) -> tensor without batch axis."""
        p = np.asarray(pixels, dtype=np.float64)
        if p.ndim == 2:
            p = p[:, :, None]
        if p.ndim != 3 or p.shape[2] != self.n_channels:
            raise DataError(f"pixels of shape {tuple(np.shape(pixels))} do not have {self.n_channels} channel(s)")
        x = (p / self._unit - self._vec(self.mean)) / self._vec(self.std)
        if self.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x, dtype=self.dtype)

    def from_tensor(self, x: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_tensor`: a tensor (with or without batch axis 1) -> (H, W, C) float pixels
        in the spec's channel order (not clipped)."""
        a = np.asarray(x, dtype=np.float64)
        if a.ndim == 4:
            if a.shape[0] != 1:
                raise DataError(f"from_tensor takes one sample, got a batch of {a.shape[0]}")
            a = a[0]
        if a.ndim != 3:
            raise DataError(f"cannot read a tensor of shape {a.shape} as an image ({self.layout})")
        if self.layout == "NCHW":
            a = a.transpose(1, 2, 0)
        if a.shape[2] != self.n_channels:
            raise DataError(f"tensor has {a.shape[2]} channels, the spec {self.n_channels} ({self.channels})")
        return (a * self._vec(self.std) + self._vec(self.mean)) * self._unit

    def pixels_to_rgb(self, pixels: np.ndarray) -> np.ndarray:
        """Spec-ordered pixels (H, W, C) -> displayable uint8 RGB (H, W, 3)."""
        p = np.clip(np.asarray(pixels, dtype=np.float64), 0, 255)
        if p.ndim == 2:
            p = p[:, :, None]
        if self.channels == "BGR":
            p = p[:, :, ::-1]
        elif self.channels == "L":
            p = np.repeat(p[:, :, :1], 3, axis=2)
        return np.round(p).astype(np.uint8)

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size) if self.size else None
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d
