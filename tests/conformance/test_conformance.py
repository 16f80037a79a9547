"""ONNX conformance (marker ``conformance``; run by .ci/run): the onnx package's backend test data.

Truth: expected outputs generated/shipped by the onnx package, and central finite differences through
onnxruntime for derivatives. The per-suite summary is printed (``pytest -s``) and by
``python -m tests.conformance.suite --grad``.
"""
from __future__ import annotations

import collections

import pytest

from .suite import SUITES, grad_check, iter_cases, run_case

pytestmark = pytest.mark.conformance

# Measured floors: the node suite must beat onnxruntime's own 1596/1884 on the same cases.
NODE_PASS_FLOOR = 1600
LIGHT_MODELS = ["light_bvlc_alexnet", "light_densenet121", "light_inception_v1", "light_inception_v2",
                "light_resnet50", "light_shufflenet", "light_squeezenet", "light_vgg19", "light_zfnet512"]


@pytest.fixture(scope="module")
def node_results():
    return [run_case(c) for c in iter_cases("node")]


def _summary(results):
    c = collections.Counter(r.status for r in results)
    return f"{c['pass']}/{len(results)} pass, {c['fail']} wrong, {c['error']} error, {c['unsupported']} unsupported"


def test_node_suite_pass_count(node_results):
    passed = sum(r.status == "pass" for r in node_results)
    print("\n[node]", _summary(node_results))
    assert len(node_results) >= 1800  # the generator really produced the suite
    assert passed >= NODE_PASS_FLOOR, _summary(node_results)


def test_node_suite_no_wrong_answers(node_results):
    """An op we cannot do must be reported as unsupported, never answered wrongly."""
    wrong = [f"{r.case.name}: {r.detail}" for r in node_results if r.status == "fail"]
    assert not wrong, "\n".join(wrong)


def test_out_of_scope_reported_as_unsupported(node_results):
    from jacaudit.models.onnx.registry import OUT_OF_SCOPE

    bad = []
    for r in node_results:
        ops = set(r.ops)
        if ops & set(OUT_OF_SCOPE) and r.status != "unsupported" and r.status != "pass":
            bad.append(f"{r.case.name}: {r.status} {r.detail}")
    assert not bad, "\n".join(bad)


def test_node_gradients_agree_with_onnxruntime_finite_differences(node_results):
    counts = collections.Counter()
    fails = []
    for r in node_results:
        if r.status != "pass":
            continue
        g = grad_check(r.case)
        counts[g.status] += 1
        if g.status == "fail":
            fails.append(f"{r.case.name}: {g.detail}")
    print(f"\n[node gradients] {counts['pass']} agree, {counts['fail']} disagree, {counts['skip']} skipped")
    assert counts["pass"] >= 1000  # measured: 1074 of the 1668 passing node tests
    assert not fails, "\n".join(fails)


@pytest.mark.parametrize("suite", ["simple", "pytorch-converted", "pytorch-operator"])
def test_model_suites(suite):
    results = [run_case(c) for c in iter_cases(suite)]
    print(f"\n[{suite}]", _summary(results))
    bad = [f"{r.case.name}: {r.status} {r.detail}" for r in results if r.status in ("fail", "error")]
    assert not bad, "\n".join(bad)
    grads = [grad_check(r.case) for r in results if r.status == "pass"]
    gfail = [g.detail for g in grads if g.status == "fail"]
    assert not gfail, "\n".join(gfail)


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_model_zoo_graph_as_shipped(name):
    (case,) = list(iter_cases("light", name))
    r = run_case(case)
    assert r.status == "pass", r.detail
