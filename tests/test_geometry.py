"""`jacaudit geometry` against truths that share no code with it: the planar arm's closed-form Jacobian (its
singular configurations, singular values and null spaces), an affine coupling's closed-form log-det, the sample
flow's own log-det output (and onnxruntime), a diagonal linear map's condition number, numpy SVDs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from jacaudit.analyses.geometry import GeometryOptions, geometry_analysis, lanczos_gram
from jacaudit.cli.main import app
from jacaudit.data.feeds import load_feeds
from jacaudit.engine.core import Target
from jacaudit.models import load
from jacaudit.results import validate
from jacaudit.samples.arm import LENGTHS, det_closed_form, jacobian_closed_form

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
ARM = ROOT / "sample_models/arm/arm.pt"
FLOW = ROOT / "sample_models/flow/flow.onnx"
CARD = json.loads((ROOT / "sample_models/arm/arm.json").read_text())


def _cli(args, code=0):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == code, (r.exit_code, r.output)
    return r


def _closed_null(J: np.ndarray):
    """(right, left) unit null vectors of a rank-deficient 3x3 closed-form J, by numpy's SVD."""
    U, S, Vh = np.linalg.svd(J)
    return Vh[-1], U[:, -1]


def _parallel(a, b, tol):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return abs(abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)) - 1) < tol


@pytest.fixture(scope="module")
def arm():
    m = load(str(ARM))
    return m, load_feeds(m, None, shape=["1,3"])


@pytest.mark.parametrize("name", ["generic", "stretched", "folded", "elbow_aligned_only", "wrist_aligned_only"])
def test_arm_configurations_match_the_closed_form(arm, name):
    m, feeds = arm
    q = np.array(CARD["configurations"][name]["q"])
    out = geometry_analysis(m, feeds, [torch.tensor(q[None])], GeometryOptions())
    p = out.result.points[0]
    J = jacobian_closed_form(q)
    s = np.linalg.svd(J, compute_uv=False)
    np.testing.assert_allclose(p.singular_values[:2], s[:2], rtol=1e-12)
    assert abs(p.singular_values[2] - s[2]) < 1e-12
    assert p.det == pytest.approx(det_closed_form(q), abs=1e-12)
    singular = abs(math.sin(q[1])) < 1e-12          # det J = l1 l2 sin q2 (closed form)
    assert p.singular is singular and p.rank == (2 if singular else 3)
    assert p.rank_tol == pytest.approx(s[0] * 3 * np.finfo(np.float64).eps, rel=1e-10)
    # manipulability sqrt(det(J J^T)) = |det J| for square J
    assert p.manipulability == pytest.approx(abs(det_closed_form(q)), abs=1e-12)
    if singular:
        right, left = _closed_null(J)
        lost_in = [d.vector for d in p.lost if d.side == "input"]
        lost_out = [d.vector for d in p.lost if d.side == "output"]
        assert len(lost_in) == 1 and len(lost_out) == 1
        assert _parallel(lost_in[0], right, 1e-10) and _parallel(lost_out[0], left, 1e-10)
        # and the lost directions truly are null: J v = 0, u^T J = 0 (closed-form J)
        assert np.abs(J @ np.array(lost_in[0])).max() < 1e-12
        assert np.abs(np.array(lost_out[0]) @ J).max() < 1e-12
    else:
        assert p.lost == [] and p.condition_number == pytest.approx(s[0] / s[2], rel=1e-10)


def test_arm_stretched_null_space_is_the_known_vector(arm):
    """Stretched at q1: (x, y) rows are parallel; the null vector is (l2 + l3 .., ..) x (1, 1, 1) in closed form."""
    m, feeds = arm
    q = np.array([0.4, 0.0, 0.0])
    p = geometry_analysis(m, feeds, [torch.tensor(q[None])], GeometryOptions()).result.points[0]
    l1, l2, l3 = LENGTHS
    v = np.cross([l1 + l2 + l3, l2 + l3, l3], [1.0, 1.0, 1.0])  # zero x/y velocity and zero phi rate
    u = np.array([math.cos(0.4), math.sin(0.4), 0.0])            # the radial output direction is unreachable
    assert _parallel([d.vector for d in p.lost if d.side == "input"][0], v, 1e-10)
    assert _parallel([d.vector for d in p.lost if d.side == "output"][0], u, 1e-10)


def test_cli_line_through_both_singularities(tmp_path):
    """q2 from -0.3 to pi + 0.3: det J = l1 l2 sin q2 changes sign at 0 and at pi; both are located, and the
    singular values along the line are the closed form's."""
    a, b = np.array([0.2, -0.3, 0.1]), np.array([0.2, math.pi + 0.3, 0.1])
    out = tmp_path / "r"
    r = _cli(["geometry", ARM, "--line", ",".join(map(repr, a.tolist())), ",".join(map(repr, b.tolist())), "--steps", "9",
              "--json", "--out", out, "--format", "json,html,md,junit"])
    d = json.loads(r.stdout)
    validate(d)
    res = d["result"]
    assert res["source"] == "line" and res["square"] and len(res["points"]) == 9
    for p in res["points"]:
        q = a + (b - a) * p["t"]
        np.testing.assert_allclose(p["input"], q, atol=1e-15)
        np.testing.assert_allclose(p["singular_values"], np.linalg.svd(jacobian_closed_form(q), compute_uv=False),
                                   rtol=1e-11, atol=1e-13)
        assert p["det"] == pytest.approx(det_closed_form(q), abs=1e-12)
    cr = res["crossings"]
    assert len(cr) == 2
    located = sorted(c["input"][1] for c in cr)
    assert abs(located[0]) < 1e-12 and abs(located[1] - math.pi) < 1e-12
    assert all(c["sigma_min"] < 1e-12 for c in cr)
    for c in cr:  # the lost direction there is the closed form's null vector
        right, _ = _closed_null(jacobian_closed_form(np.array(c["input"])))
        assert _parallel([x["vector"] for x in c["lost"] if x["side"] == "input"][0], right, 1e-8)
    checks = {c["check"]: c for c in d["checks"]}
    assert checks["singular_inputs"]["status"] == "warn" and d["status"] == "warn" and d["exit_code"] == 0
    html = (out / "report.html").read_text()
    assert "Along the trajectory" in html and "<svg" in html and "Singular inputs located" in html
    assert "singular input between" in (out / "report.md").read_text()
    # the gate: a bound on the condition number along the trajectory fails (exit 1)
    r = _cli(["geometry", ARM, "--line", "0.2,-0.3,0.1", "0.2,0.3,0.1", "--steps", "4", "--json",
              "--fail-on", "condition_number>20", "--out", tmp_path / "r2", "--format", "json"], code=1)
    d = json.loads(r.stdout)
    c = {c["check"]: c for c in d["checks"]}["condition_number"]
    assert c["status"] == "fail"
    qs = [np.array([0.2, v, 0.1]) for v in np.linspace(-0.3, 0.3, 4)]
    expect = max(np.linalg.cond(jacobian_closed_form(q)) for q in qs)
    assert c["value"] == pytest.approx(expect, rel=1e-9)


def test_cli_trajectory_file_and_threshold(tmp_path):
    qs = np.array([CARD["configurations"][k]["q"] for k in ("generic", "stretched", "wrist_aligned_only")])
    f = tmp_path / "traj.npy"
    np.save(f, qs)
    r = _cli(["geometry", ARM, "--trajectory", f, "--threshold", "0.25", "--json", "--out", tmp_path / "r",
              "--format", "json"])
    res = json.loads(r.stdout)["result"]
    s_min = [np.linalg.svd(jacobian_closed_form(q), compute_uv=False)[-1] for q in qs]
    assert res["singular_points"] == [i for i, s in enumerate(s_min) if s <= 0.25] == [0, 1]
    assert res["crossings"] == []  # the sign change of det next to the singular input #1 is that input itself


def test_log_det_refused_when_not_square(tmp_path):
    lin = torch.nn.Linear(3, 2, bias=False).double()
    p = tmp_path / "lin.pt"
    torch.jit.script(lin).save(str(p))
    r = _cli(["geometry", p, "--shape", "1,3", "--logdet", "--out", tmp_path / "r"], code=2)
    assert "needs a square Jacobian" in r.output and "2 x 3" in r.output
    # without --logdet: reported without det, manipulability = prod(sigma) = sqrt(det(W W^T))
    r = _cli(["geometry", p, "--shape", "1,3", "--json", "--out", tmp_path / "r", "--format", "json"])
    pt = json.loads(r.stdout)["result"]["points"][0]
    W = lin.weight.detach().numpy()
    assert pt["det"] is None
    assert pt["manipulability"] == pytest.approx(math.sqrt(np.linalg.det(W @ W.T)), rel=1e-10)
    assert pt["gauss_newton"]["condition_number"] is None  # inf: J^T J (3x3) has rank 2 -> null in JSON
    assert pt["null_dim"] == 1 and pt["left_null_dim"] == 0
    v = [d["vector"] for d in pt["lost"] if d["side"] == "input"][0]
    assert np.abs(W @ np.array(v)).max() < 1e-12


# ---- normalizing flows ----------------------------------------------------------------------------------
class Coupling(torch.nn.Module):
    """x = (a, b) in R^2 x R^2: z = (a, b * exp(s(a)) + t(a)), s = tanh(A a + c): log|det| = sum s (closed form)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.A = torch.nn.Parameter(torch.randn(2, 2, generator=g, dtype=torch.float64), requires_grad=False)
        self.c = torch.nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64), requires_grad=False)
        self.B = torch.nn.Parameter(torch.randn(2, 2, generator=g, dtype=torch.float64), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x[:, :2], x[:, 2:]
        s = torch.tanh(a @ self.A.t() + self.c)
        return torch.cat([a, b * torch.exp(s) + torch.sin(a @ self.B.t())], 1)


def test_affine_coupling_closed_form_logdet_and_density(tmp_path):
    mod = Coupling()
    p = tmp_path / "coupling.pt"
    torch.jit.script(mod).save(str(p))
    X = np.random.default_rng(1).standard_normal((5, 4))
    f = tmp_path / "x.npy"
    np.save(f, X)
    r = _cli(["geometry", p, "--trajectory", f, "--density", "--json", "--out", tmp_path / "r", "--format", "json"])
    pts = json.loads(r.stdout)["result"]["points"]
    A, c = mod.A.numpy(), mod.c.numpy()
    for x, pt in zip(X, pts):
        s = np.tanh(A @ x[:2] + c)
        z = np.concatenate([x[:2], x[2:] * np.exp(s) + np.sin(mod.B.numpy() @ x[:2])])
        assert pt["logdet"] == pytest.approx(s.sum(), abs=1e-13)
        assert pt["logdet_sv"] == pytest.approx(s.sum(), abs=1e-12)
        assert pt["det"] == pytest.approx(math.exp(s.sum()), rel=1e-12)
        assert pt["log_density"] == pytest.approx(-0.5 * z @ z - 2 * math.log(2 * math.pi) + s.sum(), abs=1e-12)


def test_sample_flow_logdet_agrees_with_its_own_output(tmp_path):
    import onnxruntime as ort

    from jacaudit.samples.flow import log_density, make_moons

    X = make_moons(6, 0, "heldout").astype(np.float64)
    f = tmp_path / "moons.npy"
    np.save(f, X)
    r = _cli(["geometry", FLOW, "--trajectory", f, "--dtype", "float64", "--logdet-output", "log_det_jacobian",
              "--json", "--out", tmp_path / "r", "--format", "json,html"])
    d = json.loads(r.stdout)
    pts = d["result"]["points"]
    sess = ort.InferenceSession(str(FLOW), providers=["CPUExecutionProvider"])
    z, ld = sess.run(None, {"x": X.astype(np.float32)})
    for i, pt in enumerate(pts):
        assert pt["logdet_discrepancy"] < 1e-5               # the card's claim, float64
        assert pt["logdet"] == pytest.approx(float(ld[i]), abs=1e-5)   # onnxruntime (float32)
        assert pt["log_density"] == pytest.approx(float(log_density(z[i].astype(np.float64), float(ld[i]))),
                                                  abs=1e-5)
    c = {c["check"]: c for c in d["checks"]}["logdet_discrepancy"]
    assert c["status"] == "pass" and c["value"] < 1e-5


# ---- conditioning and Gauss-Newton curvature ---------------------------------------------------------------
def test_diagonal_map_condition_number_svd_and_lanczos():
    dvals = torch.tensor([10.0, *np.linspace(1.0, 2.0, 58), 0.1], dtype=torch.float64)

    def f(x):
        return x * dvals

    x = torch.ones(60, dtype=torch.float64)
    feeds = type("F", (), {"feeds": {"x": x}, "input_name": "x", "warnings": [], "synthetic": False,
                           "source": "test"})()

    for method in ("svd", "lanczos"):
        out = geometry_analysis(f, feeds, None, GeometryOptions(method=method, lanczos_steps=60))
        p = out.result.points[0]
        assert p.method == method
        assert p.condition_number == pytest.approx(100.0, rel=1e-8)
        assert p.gauss_newton.condition_number == pytest.approx(1e4, rel=1e-7)
        assert p.sigma_max == pytest.approx(10.0, rel=1e-12) and p.sigma_min == pytest.approx(0.1, rel=1e-8)
    # Lanczos short of the full Krylov space: the extremes converge first (residual bounds say so)
    t = Target(f, x)
    lz = lanczos_gram(t, steps=30)
    assert lz["values"][0] == pytest.approx(10.0, rel=1e-10) and lz["converged"][0]
    assert not lz["exact"] and lz["steps"] == 30


def test_lanczos_on_a_wide_map_matches_numpy():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 80, generator=g, dtype=torch.float64)
    t = Target(lambda x: W @ x, torch.zeros(80, dtype=torch.float64))
    lz = lanczos_gram(t, steps=40)  # Gram J J^T is 5x5: exact after 5 steps
    assert lz["side"] == "output" and lz["exact"]
    np.testing.assert_allclose(lz["values"], np.linalg.svd(W.numpy(), compute_uv=False), rtol=1e-10)


# ---- visuomotor sample policy ------------------------------------------------------------------------------
def test_policy_steers_to_the_dot_and_its_maps_are_the_closed_form(tmp_path):
    import onnxruntime as ort

    card = json.loads((ROOT / "sample_models/policy/policy.json").read_text())
    onnx_path = ROOT / "sample_models/policy/policy.onnx"
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for name, dot in card["dots"].items():
        img = np.load(ROOT / "sample_models/policy" / dot["file"])
        # the known answer: the action points at the dot (onnxruntime, no jacaudit code)
        assert np.abs(sess.run(None, {"image": img})[0][0] - np.array(dot["dot_xy"])).max() < 0.005
    dot = card["dots"]["dot_lower"]
    f = ROOT / "sample_models/policy" / dot["file"]
    r = _cli(["geometry", onnx_path, "--input", f, "--dtype", "float64", "--json", "--out", tmp_path / "r",
              "--format", "json,html"])
    res = json.loads(r.stdout)["result"]
    img = np.load(f).astype(np.float64).reshape(-1)
    # closed form du_k/dI_p = beta p_p (c_pk - u_k), with the pixel coordinates as the ONNX file stores them
    X, Y = np.meshgrid(np.linspace(-1, 1, 32), np.linspace(-1, 1, 32))
    C = np.stack([X.ravel(), Y.ravel()]).astype(np.float32).astype(np.float64)
    z = card["beta"] * img
    pr = np.exp(z - z.max())
    pr /= pr.sum()
    J = card["beta"] * pr[None] * (C - (C @ pr)[:, None])
    assert [mp["output_index"] for mp in res["maps"]] == [0, 1]
    for k, mp in enumerate(res["maps"]):
        np.testing.assert_allclose(np.array(mp["map"]).reshape(-1), J[k], rtol=1e-9, atol=1e-12)
        assert abs(mp["peak"][0] - dot["dot_rc"][0]) <= 1.5 and abs(mp["peak"][1] - dot["dot_rc"][1]) <= 1.5
    p = res["points"][0]
    assert p["rank"] == 2
    np.testing.assert_allclose(p["singular_values"], np.linalg.svd(J, compute_uv=False), rtol=1e-9)
    assert "Sensitivity maps" in (tmp_path / "r" / "report.html").read_text()


def test_past_the_memory_budget_lanczos_and_logdet_refused(tmp_path):
    """J (40 x 40, 12.8 kB) over a 4 kB budget: never materialised; Lanczos gives numpy's extreme singular
    values; log|det| is refused (exit 2) since it needs all of them."""
    lin = torch.nn.Linear(40, 40, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(_with_spectrum(40), dtype=torch.float64))
    p = tmp_path / "lin40.pt"
    torch.jit.script(lin).save(str(p))
    args = ["geometry", p, "--shape", "1,40", "--max-memory", "4kB", "--lanczos-steps", "40"]
    r = _cli([*args, "--json", "--out", tmp_path / "r", "--format", "json"])
    pt = json.loads(r.stdout)["result"]["points"][0]
    s = np.linalg.svd(lin.weight.detach().numpy(), compute_uv=False)
    assert pt["method"] == "lanczos" and pt["det"] is None
    assert pt["sigma_max"] == pytest.approx(s[0], rel=1e-8) and pt["sigma_min"] == pytest.approx(s[-1], rel=1e-6)
    assert pt["gauss_newton"]["condition_number"] == pytest.approx((s[0] / s[-1]) ** 2, rel=1e-5)
    r = _cli([*args, "--logdet", "--out", tmp_path / "r2"], code=2)
    assert "needs every singular value" in r.output


def _with_spectrum(n):
    rng = np.random.default_rng(4)
    Q1, _ = np.linalg.qr(rng.standard_normal((n, n)))
    Q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return Q1 @ np.diag(np.linspace(5.0, 0.5, n)) @ Q2.T
