"""The bad-input corpus: hostile and odd model files, inputs, misbehaving models and bad options, each run through
the CLI with its documented exit code (README, "Exit codes").

For every case: the exit code; an error is exactly one line on stderr (``error: ...``) and no traceback; a run
that failed leaves no ``--out`` folder behind, a run that completed leaves its report; nothing hangs (a per-case
alarm); a hostile pickle never runs (its marker file never appears). Every file is built by code
(:mod:`tests.badinputs.builders`); the commands run in-process (``CliRunner``), a few also as a subprocess with
``--debug`` (the traceback is shown there).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from jacaudit.cli.main import app

from . import builders as B

torch.set_num_threads(1)
ROOT = B.ROOT
TAB = str(B.TABULAR)
ARM = str(B.ARM)
SHAPES = str(ROOT / "sample_models/shapes/shapes_cnn.onnx")
OUT = "{out}"          # replaced by the case's --out folder
CASE_TIMEOUT = 60      # seconds; a case that takes longer is a hang


@dataclass
class Case:
    id: str
    cls: str                                   # the class in the report: model, input, behaviour, option
    argv: Callable[[Path, Path], list]         # (folder, marker) -> command line
    code: int
    msg: str | None = None                     # a substring of the one stderr line (errors) / of stderr (others)
    report: bool | None = None                 # None: a report exists iff the exit code is 0, 1 or 4
    xfail: str | None = None
    extra: dict = field(default_factory=dict)


def J(model, *extra):
    return ["jacobian", model, "--out", OUT, *extra]


def I(model, *extra):  # noqa: E743
    return ["inspect", model, "--out", OUT, *extra]


def S(model, *inputs_and_opts):
    return ["saliency", model, *inputs_and_opts, "--out", OUT, "--method", "grad"]


def _img(d, name="a.png", **kw):
    return str(B.image(d / "imgs", name, **kw))


def _imgdir(d, *names):
    for n in names:
        B.image(d / "imgs", n)
    return str(d / "imgs")


def _folder(d, name, *files):
    (d / name).mkdir()
    for f in files:
        (d / name / f).write_text("not an input\n")
    return str(d / name)


def _tab_csv(d, text):
    return str(B.csv(d, "t.csv", text))


GOOD_CSV = "a,b,c\n0.1,0.2,0.3\n0.4,0.5,0.6\n"

CASES: list[Case] = [
    # ---- model files ------------------------------------------------------------------------------------------
    Case("empty-onnx", "model", lambda d, m: I(str(B.empty_file(d, "e.onnx"))), 2),
    Case("empty-pt", "model", lambda d, m: I(str(B.empty_file(d, "e.pt"))), 2),
    Case("empty-noext", "model", lambda d, m: I(str(B.empty_file(d, "model"))), 2),
    Case("truncated-onnx", "model", lambda d, m: I(str(B.truncated_copy(B.TABULAR, d, "t.onnx"))), 2),
    Case("truncated-onnx-jacobian", "model",
         lambda d, m: J(str(B.truncated_copy(B.TABULAR, d, "t.onnx", 0.9))), 2),
    Case("truncated-pt", "model", lambda d, m: I(str(B.truncated_copy(B.ARM, d, "t.pt"))), 2),
    Case("random-onnx", "model", lambda d, m: I(str(B.random_file(d, "r.onnx"))), 2),
    Case("random-pt", "model", lambda d, m: I(str(B.random_file(d, "r.pt"))), 2),
    Case("random-bin", "model", lambda d, m: I(str(B.random_file(d, "r.bin"))), 2),
    Case("tensorproto-onnx", "model", lambda d, m: I(str(B.not_a_model_protobuf(d))), 2),
    Case("graphproto-onnx", "model", lambda d, m: I(str(B.graph_only(d))), 2),
    Case("modelproto-without-graph", "model", lambda d, m: J(str(B.no_graph(d))), 2),
    Case("graph-without-outputs", "model", lambda d, m: J(str(B.no_outputs(d))), 2),
    Case("cycle", "model", lambda d, m: J(str(B.cycle(d))), 2),
    Case("cycle-inspect", "model", lambda d, m: I(str(B.cycle(d))), 2),
    Case("undefined-tensor", "model", lambda d, m: J(str(B.undefined_tensor(d))), 2),
    Case("undefined-graph-output", "model", lambda d, m: J(str(B.undefined_output(d))), 2),
    Case("future-opset", "model", lambda d, m: J(str(B.future_opset(d))), 2, msg="opset"),
    Case("custom-domain-op", "model", lambda d, m: J(str(B.custom_op(d))), 2, msg="com.example::FancyActivation"),
    Case("custom-domain-op-inspect", "model", lambda d, m: I(str(B.custom_op(d))), 1,
         msg="FancyActivation"),
    Case("unknown-op", "model", lambda d, m: J(str(B.unsupported_op(d))), 2, msg="NotARealOnnxOp"),
    Case("sequence-input", "model", lambda d, m: J(str(B.sequence_input(d))), 2),
    Case("external-data-outside-folder", "model", lambda d, m: J(str(B.external_outside(d))), 2),
    Case("external-data-absolute-path", "model", lambda d, m: J(str(B.external_absolute(d))), 2),
    Case("external-data-missing", "model", lambda d, m: J(str(B.external_missing(d))), 2),
    Case("external-data-symlink-out", "model", lambda d, m: J(str(B.external_symlink(d))), 2),
    Case("external-data-too-short", "model", lambda d, m: J(str(B.external_short(d))), 2),
    Case("external-data-inside-ok", "model", lambda d, m: J(str(B.external_ok(d))), 0),
    Case("huge-declared-initializer", "model", lambda d, m: J(str(B.huge_initializer(d))), 2),
    Case("huge-declared-input-jacobian", "model", lambda d, m: J(str(B.huge_input(d))), 2, msg="too large"),
    Case("huge-declared-input-verify", "model", lambda d, m: ["verify", str(B.huge_input(d)), "--out", OUT], 2,
         msg="too large"),
    Case("initializer-size-mismatch", "model", lambda d, m: J(str(B.wrong_size_initializer(d))), 2),
    Case("zero-dim-input", "model", lambda d, m: J(str(B.zero_dim(d))), 2),
    Case("model-missing", "model", lambda d, m: J(str(d / "nope.onnx")), 2, msg="not found"),
    Case("model-is-folder", "model", lambda d, m: J(str(d)), 2, msg="folder"),
    Case("state-dict", "model", lambda d, m: J(str(B.state_dict(d))), 2, msg="state_dict"),
    Case("pickled-module", "model", lambda d, m: J(str(B.pickled_module(d))), 2, msg="torch.save"),
    Case("torch-package", "model", lambda d, m: J(str(B.torch_package(d))), 2, msg="torch.package"),
    Case("torch-package-real", "model", lambda d, m: J(str(B.real_torch_package(d))), 2, msg="torch.package"),
    Case("plain-zip-pt", "model", lambda d, m: J(str(B.plain_zip(d))), 2),
    Case("zip-with-undecodable-names", "model", lambda d, m: J(str(B.zip_bad_names(d))), 2, msg="corrupt"),
    Case("json-named-pt", "model", lambda d, m: J(str(B.json_pt(d))), 2),
    Case("hostile-legacy-pickle", "model", lambda d, m: J(str(B.hostile_legacy_pt(d, m))), 2),
    Case("hostile-pickle-in-zip", "model", lambda d, m: J(str(B.hostile_zip_pt(d, m))), 2),
    Case("hostile-pickle-in-torchscript", "model", lambda d, m: J(str(B.hostile_torchscript(d, m))), 2),
    # ---- inputs -------------------------------------------------------------------------------------------------
    Case("image-wrong-size", "input", lambda d, m: S(str(B.image_model(d)), _img(d, size=(31, 17))), 0),
    Case("image-grey-to-rgb", "input", lambda d, m: S(str(B.image_model(d)), _img(d, mode="L")), 0),
    Case("image-cmyk", "input", lambda d, m: S(str(B.image_model(d)), _img(d, "a.jpg", mode="CMYK")), 0),
    Case("image-16bit", "input", lambda d, m: S(str(B.image_model(d)), _img(d, mode="I;16")), 0),
    Case("image-palette", "input", lambda d, m: S(str(B.image_model(d)), _img(d, mode="P")), 0),
    Case("image-alpha", "input", lambda d, m: S(str(B.image_model(d)), _img(d, mode="RGBA")), 0),
    Case("image-1x1", "input", lambda d, m: S(str(B.image_model(d)), _img(d, size=(1, 1))), 0),
    Case("image-bomb", "input", lambda d, m: S(str(B.image_model(d)), str(B.bomb_png(d))), 2, msg="decompression-bomb limit"),
    # 1.5 x Pillow's pixel limit (Image.MAX_IMAGE_PIXELS): between the limit and twice it Pillow only warns
    Case("image-bomb-below-twice-the-limit", "input",
         lambda d, m: S(str(B.image_model(d)), str(B.bomb_png(d, B.side_between_bomb_limits()))), 2,
         msg="decompression-bomb limit"),
    Case("image-truncated", "input", lambda d, m: S(str(B.image_model(d)), str(B.truncated_png(d))), 2),
    Case("image-corrupt", "input", lambda d, m: S(str(B.image_model(d)), str(B.corrupt_png(d))), 2),
    Case("image-text-named-png", "input", lambda d, m: S(str(B.image_model(d)), str(B.text_png(d))), 2),
    Case("image-empty-file", "input", lambda d, m: S(str(B.image_model(d)), str(B.empty_file(d, "e.png"))), 2),
    Case("image-missing", "input", lambda d, m: S(str(B.image_model(d)), str(d / "nope.png")), 2),
    Case("folder-empty", "input", lambda d, m: S(str(B.image_model(d)), _folder(d, "empty")), 2),
    Case("folder-no-images", "input", lambda d, m: S(str(B.image_model(d)), _folder(d, "x", "a.txt", "b.csv")), 2),
    Case("folder-mixed-good-bad", "input",
         lambda d, m: S(str(B.image_model(d)), (_imgdir(d, "a.png", "b.png"), B.text_png(d / "imgs"))[0]), 2,
         report=True, msg="skipped"),
    Case("image-to-tabular-model", "input", lambda d, m: S(TAB, _img(d)), 2),
    Case("npy-wrong-shape", "input", lambda d, m: J(TAB, "-i", str(B.npy(d, "a.npy", np.ones((1, 5), np.float32)))),
         2),
    Case("npy-wrong-rank", "input",
         lambda d, m: J(TAB, "-i", str(B.npy(d, "a.npy", np.ones((1, 2, 12), np.float32)))), 2),
    Case("npy-nan", "input",
         lambda d, m: J(TAB, "-i", str(B.npy(d, "a.npy", np.where(np.arange(12) == 3, np.nan, 0.5)[None]))), 2,
         msg="NaN"),
    Case("npy-inf", "input",
         lambda d, m: J(TAB, "-i", str(B.npy(d, "a.npy", np.where(np.arange(12) == 3, -np.inf, 0.5)[None]))), 2),
    Case("npy-object", "input",
         lambda d, m: J(TAB, "-i", str(B.npy(d, "a.npy", np.array([[1, "a"]], dtype=object)))), 2),
    Case("npy-strings", "input", lambda d, m: J(TAB, "-i", str(B.npy(d, "a.npy", np.array([["a"] * 12])))), 2),
    Case("npy-complex", "input", lambda d, m: J(TAB, "-i", str(B.npy(d, "a.npy", np.ones((1, 12), complex)))), 2),
    Case("npy-int-ok", "input", lambda d, m: J(TAB, "-i", str(B.npy(d, "a.npy", np.ones((1, 12), np.int32)))), 0),
    Case("npy-hostile-object", "input", lambda d, m: J(TAB, "-i", str(B.hostile_npy(d, m))), 2, msg="pickled"),
    Case("npz-hostile-object", "input", lambda d, m: J(TAB, "-i", str(B.hostile_npz(d, m))), 2),
    Case("npy-truncated", "input",
         lambda d, m: J(TAB, "-i", str(B.truncated_copy(B.npy(d, "full.npy", np.ones((1, 12), np.float32)), d,
                                                        "t.npy", 0.7))), 2),
    Case("npy-random-bytes", "input", lambda d, m: J(TAB, "-i", str(B.random_file(d, "r.npy"))), 2),
    Case("npz-unknown-name", "input",
         lambda d, m: J(TAB, "-i", str((np.savez(d / "a.npz", a=np.ones((1, 12)), b=np.ones(1)), d / "a.npz")[1])),
         2, msg="names no model input"),
    Case("input-missing-file", "input", lambda d, m: J(TAB, "-i", str(d / "nope.npy")), 2),
    Case("csv-missing-columns", "input", lambda d, m: S(str(B.table_model(d)), _tab_csv(d, "a,b\n1,2\n3,4\n")), 2),
    Case("csv-text-cells", "input",
         lambda d, m: S(str(B.table_model(d)), _tab_csv(d, "a,b,c\n1,two,3\n4,5,6\n")), 2),
    Case("csv-empty", "input", lambda d, m: S(str(B.table_model(d)), _tab_csv(d, "")), 2),
    Case("csv-header-only", "input", lambda d, m: S(str(B.table_model(d)), _tab_csv(d, "a,b,c\n")), 2),
    Case("csv-nan-cell", "input", lambda d, m: S(str(B.table_model(d)), _tab_csv(d, "a,b,c\n1,nan,3\n4,5,6\n")), 2),
    Case("csv-ragged", "input", lambda d, m: S(str(B.table_model(d)), _tab_csv(d, "a,b,c\n1,2,3,4\n4,5\n")), 2),
    Case("csv-ok", "input", lambda d, m: S(str(B.table_model(d)), _tab_csv(d, GOOD_CSV)), 0),
    Case("shape-malformed", "input", lambda d, m: J(ARM, "--shape", "1,q"), 2),
    Case("shape-negative", "input", lambda d, m: J(ARM, "--shape", "1,-3"), 2),
    Case("shape-zero", "input", lambda d, m: J(ARM, "--shape", "1,0"), 2),
    Case("shape-wrong-for-model", "input", lambda d, m: J(TAB, "--shape", "1,5"), 2),
    Case("trajectory-nan", "input",
         lambda d, m: ["geometry", TAB, "--out", OUT, "--trajectory",
                       str(B.npy(d, "t.npy", np.where(np.arange(36).reshape(3, 12) == 14, np.nan, 0.5)))], 2,
         msg="NaN"),
    Case("line-end-inf", "input",
         lambda d, m: ["geometry", TAB, "--out", OUT, "--line", ",".join(["0"] * 12),
                       ",".join(["inf"] + ["1"] * 11)], 2, msg="inf"),
    Case("trajectory-object", "input",
         lambda d, m: ["geometry", TAB, "--out", OUT, "--trajectory",
                       str(B.npy(d, "t.npy", np.array([[1, "a"]], dtype=object)))], 2),
    # ---- models that misbehave ---------------------------------------------------------------------------------
    Case("nan-output-onnx", "behaviour", lambda d, m: J(str(B.nan_output(d))), 1, msg="nonfinite_entries"),
    Case("nan-output-torchscript", "behaviour", lambda d, m: J(str(B.nan_ts(d)), "--shape", "1,3"), 1),
    Case("rank0-output", "behaviour", lambda d, m: J(str(B.rank0_output(d))), 0),
    Case("integer-output", "behaviour", lambda d, m: J(str(B.int_output(d))), 2, msg="int"),
    Case("argmax-output-no-gradient", "behaviour", lambda d, m: J(str(B.argmax_output(d))), 2),
    Case("zero-jacobian-floor", "behaviour", lambda d, m: J(str(B.floor_output(d))), 0, msg="zero everywhere"),
    Case("zero-saliency-floor", "behaviour",
         lambda d, m: ["saliency", str(B.floor_output(d)), "--out", OUT, "--method", "grad"], 4, msg="zero everywhere"),
    Case("quantised-graph", "behaviour", lambda d, m: J(str(B.quantised(d))), 2, msg="QuantizeLinear"),
    Case("html-in-model-strings", "behaviour",
         lambda d, m: ["saliency", str(B.html_model(d / "xss")), _img(d), "--out", OUT, "--method", "grad"], 0),
    Case("html-in-model-inspect", "behaviour", lambda d, m: I(str(B.html_model(d / "xss")), "--tensors"), 0),
    Case("torchscript-needs-model-arg", "behaviour", lambda d, m: J(str(B.extra_arg_ts(d)), "--shape", "1,3"), 2,
         msg="--model-arg"),
    Case("torchscript-model-arg-given", "behaviour",
         lambda d, m: ["--model-arg", "3", *J(str(B.extra_arg_ts(d)), "--shape", "1,3")], 0),
    Case("torchscript-raises", "behaviour", lambda d, m: J(str(B.raising_ts(d)), "--shape", "1,3"), 3,
         msg="expected 7 features"),
    Case("model-arg-on-onnx", "behaviour", lambda d, m: ["--model-arg", "3", *J(TAB)], 2, msg="TorchScript"),
    # ---- bad options --------------------------------------------------------------------------------------------
    Case("threads-0", "option", lambda d, m: ["--threads", "0", *J(TAB)], 2),
    Case("unknown-option", "option", lambda d, m: J(TAB, "--frobnicate"), 2),
    Case("unknown-command", "option", lambda d, m: ["frobnicate", TAB], 2),
    Case("missing-argument", "option", lambda d, m: ["jacobian"], 2),
    Case("saliency-unknown-method", "option",
         lambda d, m: ["saliency", TAB, "--out", OUT, "--method", "telepathy"], 2),
    Case("saliency-ig-steps-negative", "option",
         lambda d, m: ["saliency", TAB, "--out", OUT, "--method", "ig", "--ig-steps", "-1"], 2),
    Case("saliency-batch-size-0", "option", lambda d, m: ["saliency", TAB, "--out", OUT, "--batch-size", "0"], 2),
    Case("saliency-unknown-reduce", "option", lambda d, m: ["saliency", TAB, "--out", OUT, "--reduce", "mean-ish"],
         2),
    Case("saliency-unknown-score", "option", lambda d, m: ["saliency", TAB, "--out", OUT, "--score", "vibes"], 2),
    Case("robustness-negative-eps", "option",
         lambda d, m: ["robustness", TAB, str(ROOT / "sample_models/tabular/tabular_heldout.csv"), "--out", OUT,
                       "--eps", "-0.1"], 2),
    Case("robustness-pgd-steps-0", "option",
         lambda d, m: ["robustness", TAB, str(ROOT / "sample_models/tabular/tabular_heldout.csv"), "--out", OUT,
                       "--pgd-steps", "0"], 2),
    Case("robustness-unknown-norm", "option",
         lambda d, m: ["robustness", TAB, str(ROOT / "sample_models/tabular/tabular_heldout.csv"), "--out", OUT,
                       "--pgd-norm", "l7"], 2),
    Case("robustness-missing-data", "option", lambda d, m: ["robustness", TAB, str(d / "nope"), "--out", OUT], 2),
    Case("transfer-probes-negative", "option",
         lambda d, m: ["transfer", TAB, str(ROOT / "sample_models/tabular/tabular_heldout.csv"), "--out", OUT,
                       "--probes", "-2"], 2),
    Case("transfer-unknown-layer", "option",
         lambda d, m: ["transfer", TAB, str(ROOT / "sample_models/tabular/tabular_heldout.csv"), "--out", OUT,
                       "--layer", "no_such_tensor"], 2),
    Case("geometry-unknown-method", "option", lambda d, m: ["geometry", TAB, "--out", OUT, "--method", "astrology"],
         2),
    Case("geometry-steps-0", "option", lambda d, m: ["geometry", TAB, "--out", OUT, "--steps", "0"], 2),
    Case("geometry-max-memory-garbage", "option",
         lambda d, m: ["geometry", TAB, "--out", OUT, "--max-memory", "lots"], 2),
    Case("geometry-max-memory-negative", "option",
         lambda d, m: ["geometry", TAB, "--out", OUT, "--max-memory", "-5MB"], 2),
    Case("gradflow-max-layers-0", "option", lambda d, m: ["gradflow", TAB, "--out", OUT, "--max-layers", "0"], 2),
    Case("gradflow-unknown-layer", "option", lambda d, m: ["gradflow", TAB, "--out", OUT, "--layers", "nope,nah"],
         2),
    Case("jacobian-past-max-memory", "option",
         lambda d, m: J(str(B.relu_model(d, [1, 3, 256, 256])), "--max-memory", "64MB"), 2, msg="--max-memory"),
    Case("jacobian-unknown-mode", "option", lambda d, m: J(TAB, "--mode", "sideways"), 2),
    Case("jacobian-top-negative", "option", lambda d, m: J(TAB, "--top", "-1"), 2),
    Case("jacobian-probes-0", "option", lambda d, m: J(TAB, "--frobenius", "--probes", "0"), 2),
    Case("jacobian-unknown-output", "option", lambda d, m: J(TAB, "--output-name", "nope"), 2),
    Case("jacobian-unknown-input", "option", lambda d, m: J(TAB, "--input-name", "nope"), 2),
    Case("jacobian-unknown-wrt", "option", lambda d, m: J(TAB, "--wrt", "nope"), 2),
    Case("verify-k-0", "option", lambda d, m: ["verify", TAB, "--out", OUT, "-k", "0"], 2),
    Case("dtype-float16", "option", lambda d, m: J(TAB, "--dtype", "float16"), 2),
    Case("seed-not-int", "option", lambda d, m: J(TAB, "--seed", "abc"), 2),
    Case("format-unknown", "option", lambda d, m: J(TAB, "--format", "xml"), 2),
    Case("fail-on-garbage", "option", lambda d, m: J(TAB, "--fail-on", "spectral_norm>>>"), 2),
    Case("fail-on-unknown-metric", "option", lambda d, m: J(TAB, "--fail-on", "happiness>3"), 2),
    Case("baseline-missing", "option", lambda d, m: J(TAB, "--baseline-report", str(d / "nope.json")), 2),
    Case("max-regression-without-baseline", "option", lambda d, m: J(TAB, "--max-regression", "0.1"), 2),
    Case("config-missing", "option", lambda d, m: ["--config", str(d / "nope.toml"), *J(TAB)], 2),
    Case("config-unknown-key", "option",
         lambda d, m: ["--config", str(B.csv(d, "j.toml", "[tool.jacaudit]\nfrobnicate = 1\n")), *J(TAB)], 2),
    Case("size-garbage", "option", lambda d, m: S(str(B.image_model(d)), _img(d), "--size", "big"), 2),
    Case("mean-std-mismatch", "option",
         lambda d, m: S(str(B.image_model(d)), _img(d), "--mean", "0.5,0.5", "--std", "0.2,0.2,0.2"), 2),
    Case("render-not-json", "option", lambda d, m: ["render", str(B.text_png(d)), "--out", str(d / "r.html")], 2),
    Case("render-unknown-format", "option",
         lambda d, m: ["render", str(B.csv(d, "r.json", "{}")), "--format", "pdfx"], 2),
    Case("render-out-under-a-file", "option",
         lambda d, m: ["render", str(ROOT / "tests/data/inspect-report-1.0.json"), "--out",
                       str(B.csv(d, "f", "x") / "r.html")], 2, msg="--out"),
    Case("render-out-is-a-folder", "option",
         lambda d, m: ["render", str(ROOT / "tests/data/inspect-report-1.0.json"), "--out", str(d),
                       "--format", "html"], 2, msg="folder"),
    Case("schema-unknown-kind", "option", lambda d, m: ["schema", "bogus"], 2, msg="bogus"),
    Case("schema-unknown", "option", lambda d, m: ["schema", "--frobnicate"], 2),
]

# --device cuda without CUDA, for every command that computes
DEVICE_CMDS = {
    "saliency": lambda d: ["saliency", TAB, "--out", OUT],
    "robustness": lambda d: ["robustness", TAB, str(ROOT / "sample_models/tabular/tabular_heldout.csv"),
                             "--out", OUT],
    "transfer": lambda d: ["transfer", TAB, str(ROOT / "sample_models/tabular/tabular_heldout.csv"), "--out", OUT],
    "geometry": lambda d: ["geometry", TAB, "--out", OUT],
    "gradflow": lambda d: ["gradflow", TAB, "--out", OUT],
    "jacobian": lambda d: J(TAB),
    "verify": lambda d: ["verify", TAB, "--out", OUT, "-k", "1"],
}
if not torch.cuda.is_available():
    CASES += [Case(f"{c}-device-cuda-without-cuda", "option",
                   (lambda f: lambda d, m: [*f(d), "--device", "cuda"])(f), 2, msg="CUDA")
              for c, f in DEVICE_CMDS.items()]

# --out that cannot be written, found before anything is computed
CASES += [
    Case("out-is-a-file", "option", lambda d, m: ["jacobian", TAB, "--out", str(B.csv(d, "f", "x"))], 2,
         msg="--out"),
    Case("out-under-a-file", "option", lambda d, m: ["jacobian", TAB, "--out", str(B.csv(d, "f", "x") / "sub")], 2,
         msg="--out"),
    Case("junit-under-a-file", "option",
         lambda d, m: ["jacobian", TAB, "--out", OUT, "--junit", str(B.csv(d, "f", "x") / "j.xml")], 2,
         msg="--junit"),
    Case("sarif-is-a-folder", "option",
         lambda d, m: ["jacobian", TAB, "--out", OUT, "--sarif", str(d)], 2, msg="--sarif"),
]


def _unwritable(d, m):
    ro = d / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    return ["saliency", TAB, "--out", str(ro / "out")]


def _root_skip():
    return "root can write into a read-only folder" if hasattr(os, "geteuid") and os.geteuid() == 0 else None


def _procfs_skip():
    return None if os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK) else \
        "no unwritable /proc/sys here"


CASES += [
    Case("out-unwritable", "option", _unwritable, 2, msg="--out", extra={"skip": _root_skip}),
    # a folder even root cannot write into (where the kernel says so)
    Case("out-unwritable-procfs", "option", lambda d, m: ["jacobian", TAB, "--out", "/proc/sys/jacaudit-out"], 2,
         msg="not writable", extra={"skip": _procfs_skip, "out": "/proc/sys/jacaudit-out"}),
    Case("npy-float64-for-float32-graph", "input",
         lambda d, m: J(TAB, "-i", str(B.npy(d, "a.npy", np.full((1, 12), 0.25)))), 0),
]


def _param(c: Case):
    marks = [pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
    return pytest.param(c, id=c.id, marks=marks)


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang(f"no answer within {CASE_TIMEOUT} s")


def _expand(argv, out):
    return [str(out) if a == OUT else str(a) for a in argv]


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case: Case, tmp_path):
    reason = case.extra["skip"]() if "skip" in case.extra else None
    if reason:
        pytest.skip(reason)
    d = tmp_path / "case"
    d.mkdir()
    marker = tmp_path / "PWNED"
    out = Path(case.extra.get("out", tmp_path / "out"))
    argv = _expand(case.argv(d, marker), out)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_TIMEOUT)
    try:
        r = CliRunner().invoke(app, argv, env={"COLUMNS": "200"})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    stderr = r.stderr
    where = f"argv={argv}\nexit={r.exit_code}\nstdout={r.stdout[-2000:]}\nstderr={stderr}\nexc={r.exception!r}"
    assert not isinstance(r.exception, _Hang), where
    assert r.exit_code == case.code, where
    assert "Traceback" not in stderr and "Traceback" not in r.stdout, where
    assert not marker.exists(), "a hostile pickle ran"
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    wrote_report = (out / "report.json").exists()
    expect_report = case.report if case.report is not None else case.code in (0, 1, 4)
    if not expect_report:
        assert len(lines) == 1 and lines[0].startswith("error:"), where
        if case.msg:
            assert case.msg.lower() in lines[0].lower(), where
        assert not out.exists(), f"a failed run left {sorted(os.listdir(out))} in --out\n{where}"
    else:
        assert not any(ln.startswith("error:") for ln in lines), where
        if "--out" in argv:
            assert wrote_report, where
        if case.msg:
            assert case.msg.lower() in (stderr + r.stdout).lower(), where


def test_corpus_size_and_classes():
    from collections import Counter

    n = Counter(c.cls for c in CASES)
    assert len(CASES) >= 80 and set(n) == {"model", "input", "behaviour", "option"}, n
    assert len({c.id for c in CASES}) == len(CASES)


# a few cases again as a user runs them: a subprocess, one line on stderr; with --debug the traceback
DEBUG_CASES = ["cycle", "npy-nan", "out-is-a-file"]


@pytest.mark.parametrize("cid", DEBUG_CASES)
def test_debug_shows_the_traceback(cid, tmp_path):
    case = next(c for c in CASES if c.id == cid)
    d = tmp_path / "case"
    d.mkdir()
    argv = _expand(case.argv(d, tmp_path / "PWNED"), tmp_path / "out")
    env = {**os.environ, "JACAUDIT_THREADS": "1"}
    cmd = [sys.executable, "-m", "jacaudit.cli.main"]
    plain = subprocess.run(["timeout", "120", *cmd, *argv], capture_output=True, text=True, env=env)
    assert plain.returncode == case.code, plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1 and "Traceback" not in plain.stderr, plain.stderr
    dbg = subprocess.run(["timeout", "120", *cmd, "--debug", *argv], capture_output=True, text=True, env=env)
    assert dbg.returncode != 0 and "Traceback (most recent call last)" in dbg.stderr, dbg.stderr
