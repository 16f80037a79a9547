"""The two-kernel HardSwish derivative (fuse._hardswish_grad_fused: torch's hardswish_backward at x shrunk by
half an ulp) against the five-kernel form that states the convention (-0.5 at -3, 1.5 at 3, 0 below, 1 above):
exact outside [-3, 3] and at the float neighbours of the kinks, to rounding inside; and the probe that picks
it is what the module uses."""
from __future__ import annotations

import math

import pytest
import torch

from jacaudit.models.onnx import fuse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_hardswish_derivative_is_the_convention(dtype):
    if not fuse._hardswish_grad_probe():
        pytest.skip("this torch's hardswish_backward does not fit: the plain form is used")
    assert fuse._hardswish_grad is fuse._hardswish_grad_fused
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=gen, dtype=dtype) * 4
    pts = []
    for v in (-3.0, 3.0):
        t = torch.tensor(v, dtype=dtype)
        lo, hi = t, t
        for _ in range(4):  # a few float neighbours each side
            lo = torch.nextafter(lo, torch.tensor(-math.inf, dtype=dtype))
            hi = torch.nextafter(hi, torch.tensor(math.inf, dtype=dtype))
            pts += [lo, hi]
        pts.append(t)
    x = torch.cat([x, torch.stack(pts)])
    g = torch.randn(x.shape, generator=gen, dtype=dtype)
    a, b = fuse._hardswish_grad_fused(g, x), fuse._hardswish_grad_plain(g, x)
    outside = (x < -3) | (x > 3)
    assert torch.equal(a[outside], b[outside])
    torch.testing.assert_close(a, b, rtol=4 * torch.finfo(dtype).eps, atol=4 * torch.finfo(dtype).eps)
    k = torch.tensor([-3.0, 3.0], dtype=dtype)
    torch.testing.assert_close(fuse._hardswish_grad(torch.ones_like(k), k), torch.tensor([-0.5, 1.5], dtype=dtype),
                               rtol=2 * torch.finfo(dtype).eps, atol=0)
