"""Derivatives at the kinks of the piecewise activations, the same in every torch release.

ONNX defines values, not derivatives; at a kink jacaudit takes one documented one-sided derivative (the op's
docstring in jacaudit/models/onnx/ops/): Clip, HardSigmoid and the RNN cell clip pass the gradient on the
closed interval; Elu, Selu and Celu take the x <= 0 branch's; HardSwish the one from inside [-3, 3]. Truth:
values from the onnx reference evaluator, derivatives from the closed forms below -- never torch.clamp, whose
derivative at a bound changed in torch 2.14 (1 before; 0.5 with tensor bounds, 0 with number bounds).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from jacaudit.models.onnx.model import OnnxModel

SELU_A, SELU_G = 1.67326319217681884765625, 1.05070102214813232421875

# op, attributes, points (kinks and near them), closed-form derivative at those points
CASES = {
    "Elu": ({"alpha": 0.75}, [0.0, -1e-3, 1e-3, -2.0], lambda x: np.where(x > 0, 1.0, 0.75 * np.exp(x))),
    "Selu": ({}, [0.0, -1e-3, 1e-3], lambda x: np.where(x > 0, SELU_G, SELU_G * SELU_A * np.exp(x))),
    "Celu": ({"alpha": 0.75}, [0.0, -1e-3, 1e-3, -2.0], lambda x: np.where(x > 0, 1.0, np.exp(x / 0.75))),
    "HardSigmoid": ({"alpha": 0.25, "beta": 0.5}, [-2.0, 2.0, -2.5, 2.5, 0.3],
                    lambda x: np.where(np.abs(x) <= 2.0, 0.25, 0.0)),
    "HardSwish": ({}, [-3.0, 3.0, -3.5, 3.5, 1.0],
                  lambda x: np.where(x < -3, 0.0, np.where(x <= 3, x / 3 + 0.5, 1.0))),
    "Relu": ({}, [0.0, -1.0, 1.0], lambda x: (x > 0).astype(float)),  # torch.relu: 0 at 0
}


def _model(op: str, attrs: dict, n: int):
    g = helper.make_graph([helper.make_node(op, ["x"], ["y"], **attrs)], op,
                          [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [n])],
                          [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [n])])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    return proto


@pytest.mark.parametrize("op", sorted(CASES))
def test_kink_derivative_is_the_documented_one(op):
    attrs, pts, deriv = CASES[op]
    x = np.array(pts, dtype=np.float64)
    proto = _model(op, attrs, len(pts))
    m = OnnxModel(proto)
    f = lambda t: m.run({"x": t})[0]  # noqa: E731
    xt = torch.from_numpy(x)
    want = torch.from_numpy(np.asarray(deriv(x), dtype=np.float64))
    vtol = 1e-7 if op == "HardSwish" else 1e-15  # the reference evaluator's HardSwish uses 1/6 in float32
    torch.testing.assert_close(f(xt), torch.from_numpy(ReferenceEvaluator(proto).run(None, {"x": x})[0]),
                               rtol=vtol, atol=vtol)
    xg = xt.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(xg).sum(), xg)
    torch.testing.assert_close(g, want, rtol=1e-15, atol=1e-15)
    _, t = torch.func.jvp(f, (xt,), (torch.ones_like(xt),))
    torch.testing.assert_close(t, want, rtol=1e-15, atol=1e-15)
    J = torch.func.jacrev(f)(xt)
    torch.testing.assert_close(J, torch.diag(want), rtol=1e-15, atol=1e-15)


def test_rnn_cell_clip_passes_the_gradient_at_the_bound():
    from jacaudit.models.onnx.ops.rnn import _clip

    class Ctx:
        def attr(self, k, d=None):
            return 0.5 if k == "clip" else d

    c = _clip(Ctx())
    x = torch.tensor([-0.5, 0.5, math.nextafter(0.5, 1), -0.7, 0.1], dtype=torch.float64, requires_grad=True)
    y = c(x)
    assert y.tolist() == [-0.5, 0.5, 0.5, -0.5, 0.1]
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]
