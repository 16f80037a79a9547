"""The shared batched-gradient primitive against a closed form: for a linear model ``s = W x + b`` the gradient
of the target score is the weight row of the target class, whatever the row, the group or the chunking."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from jacaudit.engine.gradients import GroupGrads, grouped_gradients, make_scorer
from jacaudit.errors import InputError
from jacaudit.models import load

D, K = 12, 5


from tests.test_saliency import Linear  # noqa: E402  (the same closed-form model: scores = W x + b)


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(K, D, generator=g, dtype=torch.float64).float()
    b = torch.randn(K, generator=g, dtype=torch.float64).float()
    p = tmp_path_factory.mktemp("lin") / "linear.pt"
    torch.jit.script(Linear(w, b)).save(str(p))
    return load(str(p)), w, b


def _rows(n, group, seed=0):
    """n groups of ``group`` rows; the non-reference rows are pushed far along other classes' weight rows, so
    their own argmax differs from their reference row's (the target must come from the reference row)."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, D, generator=g)
    rows = ref[:, None].repeat(1, group, 1)
    rows[:, 1:] += 5 * torch.randn(n, group - 1, D, generator=g)
    return rows.reshape(n * group, D), ref


def test_gradient_is_the_weight_row_of_the_top1_class(linear):
    model, w, b = linear
    sc = make_scorer(model)
    assert sc.score == "output" and sc.prob_tensor is None
    x, _ = _rows(7, 1)
    gg = grouped_gradients(sc, x, 1)
    assert isinstance(gg, GroupGrads)
    logits = x @ w.t() + b
    top = logits.argmax(1)
    assert torch.equal(gg.targets, top)
    assert torch.allclose(gg.grads, w[top], atol=1e-6)
    assert torch.allclose(gg.scores, logits.gather(1, top[:, None]).squeeze(1), atol=1e-5)
    assert torch.allclose(gg.ref_scores, logits, atol=1e-5) and gg.ref_probs is None


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8, 64])
def test_groups_take_the_reference_rows_target_whatever_the_chunking(linear, chunk):
    model, w, b = linear
    n, group = 4, 5
    rows, ref = _rows(n, group, seed=1)
    want = (ref @ w.t() + b).argmax(1)
    own = (rows @ w.t() + b).argmax(1).reshape(n, group)
    assert (own[:, 1:] != want[:, None]).any()  # the other rows alone would pick other classes
    gg = grouped_gradients(make_scorer(model), rows, group, chunk_rows=chunk)
    assert torch.equal(gg.targets, want)
    assert torch.allclose(gg.grads, w[want].repeat_interleave(group, 0), atol=1e-6)
    assert torch.allclose(gg.ref_scores, ref @ w.t() + b, atol=1e-5)
    whole = grouped_gradients(make_scorer(model), rows, group, chunk_rows=10_000)
    assert torch.equal(gg.targets, whole.targets)
    assert torch.equal(gg.grads, whole.grads)  # the gradient of a linear map is exact whatever the batch
    assert torch.allclose(gg.scores, whole.scores, rtol=1e-6, atol=1e-6)  # (matmul rounding differs by batch)


def test_fixed_targets_and_out_of_range(linear):
    model, w, _ = linear
    rows, _ = _rows(3, 2)
    t = torch.tensor([4, 0, 2])
    gg = grouped_gradients(make_scorer(model), rows, 2, targets=t, chunk_rows=3)
    assert torch.equal(gg.targets, t)
    assert torch.allclose(gg.grads, w[t].repeat_interleave(2, 0), atol=1e-6)
    with pytest.raises(InputError, match="out of range"):
        grouped_gradients(make_scorer(model), rows, 2, targets=torch.tensor([K, 0, 0]))


def test_onnx_softmax_model_differentiates_the_logits(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = np.random.default_rng(0)
    w = g.standard_normal((K, D)).astype(np.float32)
    b = g.standard_normal(K).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    graph = helper.make_graph(nodes, "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", K])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "lin.onnx"))
    model = load(str(tmp_path / "lin.onnx"))
    sc = make_scorer(model)
    assert sc.score == "logit" and sc.score_tensor == "logits" and sc.prob_tensor == "probs"
    rows, ref = _rows(3, 3, seed=2)
    gg = grouped_gradients(sc, rows, 3, chunk_rows=4)
    logits = ref.double() @ torch.from_numpy(w).double().t() + torch.from_numpy(b).double()
    assert torch.equal(gg.targets, logits.argmax(1))
    assert torch.allclose(gg.grads, torch.from_numpy(w)[gg.targets].repeat_interleave(3, 0), atol=1e-5)
    assert torch.allclose(gg.ref_probs.double(), torch.softmax(logits, 1), atol=1e-5)
    # use_logits=False differentiates the probability output itself
    assert make_scorer(model, use_logits=False).score == "output"
