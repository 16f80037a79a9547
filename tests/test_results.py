"""The report spine: envelope, JSON round trip, schema derived from type hints, `jacaudit schema`."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import jsonschema
import pytest

from jacaudit import results as R
from jacaudit.results.saliency import (ClassScore, Concentration, FailedInput, InputSaliency, MethodMap,
                                       SaliencyResult, SanityCheck, SanityStep)

# a 1x1 PNG
PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc0000003010100"
    "c9fe92ef0000000049454e44ae426082")).decode()
EVIL = '<script>alert("x")</script>'


def example_report(kind_status: int = 0) -> R.Report:
    img = R.Image(data=PNG, width=1, height=1, alt=EVIL)
    conc = Concentration(0.5, 0.25, "upper-centre", 0.4, 0.12, [0, 0, 1, 1])
    m = MethodMap("ig", img, img, "x.npy", conc, 1.5, completeness_gap=0.01, f_x=2.0, f_baseline=0.5,
                  mask_fraction=0.9)
    inp = InputSaliency(EVIL + ".png", "/tmp/" + EVIL, False, [ClassScore(3, EVIL, 2.0, 0.7)],
                        ClassScore(3, EVIL, 2.0, float("nan")), img, [m])
    res = SaliencyResult(["ig"], "top1", "logit", "logits", "max-abs", "input", {"size": [1, 1]}, "black", 50,
                         None, None, [inp], [FailedInput("bad.png", "bad.png: not an image " + EVIL)],
                         [SanityCheck("ig", [SanityStep(["w1"], 0.2)], 0.2, 0.5, False)])

    class M:
        path = "/models/" + EVIL + ".onnx"
        format = "onnx"
        metadata = {"sha256": "ab" * 32, "opset": {"ai.onnx": 17}, "producer": EVIL, "parameters": 10}
        inputs, outputs = [], []

    return R.make_report("saliency", res, model=M(), settings={"method": "ig", "seed": 0, "steps": 50},
                         timings={"total": 1.0}, warnings=[EVIL], exit_code=kind_status, argv=["jacaudit", EVIL])


def test_roundtrip_and_validate():
    rep = example_report()
    text = R.to_json(rep)
    d = json.loads(text)
    assert d["schema_version"] == R.SCHEMA_VERSION and d["kind"] == "saliency"
    assert d["result"]["inputs"][0]["target"]["probability"] is None  # NaN -> null
    R.validate(d)
    back = R.from_json(text)
    assert isinstance(back.result, SaliencyResult)
    assert back.result.inputs[0].maps[0].concentration.bbox50 == [0, 0, 1, 1]
    assert R.to_json(back) == text


def test_schema_rejects_bad_reports():
    d = json.loads(R.to_json(example_report()))
    d["result"]["score"] = "banana"
    with pytest.raises(jsonschema.ValidationError):
        R.validate(d)
    d = json.loads(R.to_json(example_report()))
    d["result"]["unexpected"] = 1
    with pytest.raises(jsonschema.ValidationError):
        R.validate(d)


def test_generic_schema_and_new_kind():
    @R.result_type("zz_test_kind")
    @dataclass(frozen=True)
    class ZZ:
        verdict: Literal["ok", "bad"]
        values: dict[str, list[float]]
        pair: tuple[int, str]
        note: str | None = field(default=None, metadata={"doc": "a note"})

    try:
        s = R.schema("zz_test_kind")
        assert s["$defs"]["ZZ"]["properties"]["note"]["description"] == "a note"
        rep = R.make_report("zz_test_kind", ZZ("ok", {"a": [1.0, float("inf")]}, (1, "b")), argv=["x"])
        R.validate(json.loads(R.to_json(rep)))
        assert R.from_json(R.to_json(rep)).result.pair == (1, "b")
        jsonschema.validate(json.loads(R.to_json(rep)), R.schema(), cls=jsonschema.Draft202012Validator)
    finally:
        R._RESULTS.pop("zz_test_kind", None)


def test_schema_cli_without_torch():
    code = ("import sys; from jacaudit.cli.main import app; "
            "sys.argv=['jacaudit','schema','saliency']; "
            "import contextlib, io\n"
            "try:\n    app()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "assert 'torch' not in sys.modules")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["properties"]["kind"]["const"] == "saliency"
    jsonschema.Draft202012Validator.check_schema(s)
