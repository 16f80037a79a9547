"""``jacaudit ops``: the list is the interpreter's registry, and every operator it names really runs.

Truths that do not share code with the command: the registry itself (``registry._REGISTRY``, ``OUT_OF_SCOPE``),
the onnx package's own backend node tests (``onnx.backend.test.case.node``: inputs and expected outputs made by
onnx's reference code) run through the interpreter, ``onnx.defs.get_schema`` per version, and one-node models of
the operators said to be missing, which the loader must refuse.
"""
from __future__ import annotations

import collections
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jacaudit.cli.main import app
from jacaudit.cli.ops_cmd import collect

ROOT = Path(__file__).resolve().parents[1]

#: listed operators without a single-op node test in the onnx package (checked against onnx.defs instead)
NO_NODE_TEST = {"GlobalLpPool"}


def _registry():
    from jacaudit.models.onnx import ops  # noqa: F401  (registers the ops)
    from jacaudit.models.onnx import registry

    return registry


def _key(entry) -> tuple[str, str]:
    return ("" if entry["domain"] == "ai.onnx" else entry["domain"], entry["op_type"])


@pytest.fixture(scope="module")
def listed():
    r = CliRunner().invoke(app, ["ops", "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_json_is_the_registry(listed):
    reg = _registry()
    assert {_key(o): o["since"] for o in listed["operators"]} == \
        {k: [s for s, _ in v] for k, v in reg._REGISTRY.items()}
    assert {r["op_type"]: r["reason"] for r in listed["refused"]} == reg.OUT_OF_SCOPE
    assert listed["opsets"]["ai.onnx"] == [7, 23]
    assert listed == json.loads(json.dumps(collect()))


def test_known_unsupported_ops_are_not_listed_as_supported(listed):
    names = {o["op_type"] for o in listed["operators"]}
    assert "ConvInteger" not in names and "QuantizeLinear" not in names and "MaxRoiPool" not in names
    assert {"Conv", "Relu", "Gemm", "LSTM", "Loop"} <= names
    refused = {r["op_type"]: r["reason"] for r in listed["refused"]}
    assert refused["ConvInteger"] == "quantization op"
    missing = {(m["domain"], m["op_type"]) for m in listed["not_implemented"]}
    assert ("ai.onnx", "MaxRoiPool") in missing and ("ai.onnx.ml", "TreeEnsembleClassifier") in missing
    assert not missing & {(o["domain"], o["op_type"]) for o in listed["operators"]}


def test_table_on_stdout_lists_every_op_once():
    p = subprocess.run([sys.executable, "-m", "jacaudit", "ops"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    lines = p.stdout.splitlines()
    rows = [ln.split() for ln in lines if ln.startswith(" ai.onnx")]
    reg = _registry()
    assert collections.Counter((r[0], r[1]) for r in rows) == \
        collections.Counter((d or "ai.onnx", n) for d, n in reg._REGISTRY)
    assert lines[0].startswith(f"{len(reg._REGISTRY)} operator(s) in 2 domain(s); loadable opsets: ai.onnx 7-23")
    conv = next(r for r in rows if r[1] == "Conv")
    assert conv[2] == "7-23" and conv[3:6] == ["1,", "11,", "22"]  # ONNX Conv-1 is in effect at opset 7
    refused = next(ln for ln in lines if ln.startswith("refused"))
    assert "ConvInteger (quantization op)" in refused
    assert not any(r[1] == "ConvInteger" for r in rows)
    assert lines[-1].startswith("not implemented: ai.onnx: MaxRoiPool;")


def test_versions_agree_with_onnx_defs(listed):
    """Each listed ONNX version is a since-version of the op's schema in that domain, and the opsets listed are
    those (within the loadable range) where a version of the op is in effect."""
    from onnx import defs

    for o in listed["operators"]:
        domain = "" if o["domain"] == "ai.onnx" else o["domain"]
        for v in o["onnx_versions"]:
            assert defs.get_schema(o["op_type"], v, domain).since_version == v, o
        lo, hi = listed["opsets"][o["domain"]]
        for a, b in o["opsets"]:
            assert lo <= a <= b <= hi, o
            assert defs.get_schema(o["op_type"], a, domain).since_version <= a
        if o["opsets"] and o["opsets"][0][0] > lo:  # not defined just below the first opset listed
            with pytest.raises(defs.SchemaError):
                defs.get_schema(o["op_type"], o["opsets"][0][0] - 1, domain)


def _node_cases():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    by = collections.defaultdict(list)
    for c in cases:
        ops = {(n.domain if n.domain != "ai.onnx" else "", n.op_type) for n in c.model.graph.node}
        if len(ops) == 1:
            by[ops.pop()].append(c)
    return by


def test_every_listed_op_runs_a_node_test_of_the_onnx_package(listed):
    """For every operator listed, at least one of onnx's own single-op node tests gives onnx's expected outputs
    through the interpreter (tests/conformance compares every case; here: the list cannot name an op that
    does not run)."""
    from tests.conformance.suite import Case, run_case

    by = _node_cases()
    failed, without = [], []
    for o in listed["operators"]:
        cases = by.get(_key(o), [])
        if not cases:
            without.append(o["op_type"])
            continue
        results = []
        for c in cases:
            ds = [(list(i), list(out)) for i, out in c.data_sets]
            res = run_case(Case("node", c.name, c.model, ds, max(c.rtol, 1e-3), max(c.atol, 1e-4)))
            results.append(f"{c.name}: {res.status} {res.detail}")
            if res.status == "pass":
                break
        else:
            failed.append(f"{o['op_type']}: " + "; ".join(results[:3]))
    assert not failed, "\n".join(failed)
    assert set(without) == NO_NODE_TEST, without  # each exception named; a new one must be looked at


def _one_node_model(tmp_path: Path, op_type: str, inputs: list[str], opset: int, domain: str = ""):
    import onnx
    from onnx import TensorProto, helper

    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, 4, 4]) for n in inputs]
    node = helper.make_node(op_type, inputs, ["y"], domain=domain)
    g = helper.make_graph([node], "g", vi, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    m = helper.make_model(g, opset_imports=imports)
    path = tmp_path / f"{op_type}.onnx"
    onnx.save(m, path)
    return path


@pytest.mark.parametrize("op_type,inputs,domain", [("ConvInteger", ["x", "w"], ""), ("MaxRoiPool", ["x", "r"], ""),
                                                   ("Normalizer", ["x"], "ai.onnx.ml")])
def test_ops_not_listed_are_refused_by_the_loader(tmp_path, op_type, inputs, domain, listed):
    """The other side: an operator `ops` does not list (refused or not implemented) is an unsupported-op
    error when a model uses it, naming the op."""
    import jacaudit
    from jacaudit.errors import UnsupportedOpError

    assert op_type not in {o["op_type"] for o in listed["operators"]}
    with pytest.raises(UnsupportedOpError, match=op_type):
        jacaudit.load(str(_one_node_model(tmp_path, op_type, inputs, 13, domain)))


def test_ops_needs_no_model_and_rejects_arguments():
    r = CliRunner().invoke(app, ["ops", "model.onnx"])
    assert r.exit_code == 2
