"""Option definitions shared by the commands: one name, one meaning, everywhere.

* ``--input`` / ``-i`` is always a data file; model tensors are chosen with ``--input-name`` / ``--output-name``
  (and ``--wrt`` for the tensor differentiated with respect to).
* The report and gate options (``--out``, ``--format``, ``--json``, ``--junit``, ``--sarif``, ``--fail-on``,
  ``--warn-on``, ``--baseline-report``, ``--max-regression``, ``--exit-zero``) are added to every command by
  :func:`jacaudit.cli.runner.audit_command`; commands do not declare them.
* Config: only the options defined here may be set at the top level of ``[tool.jacaudit]`` (they mean the same
  in every command); anything else goes in the command's own table (``[tool.jacaudit.saliency]``).

Nothing here imports torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

PP = "Preprocessing"
GATE = "Checks and CI"
RUN = "Runtime"

ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help="ONNX (.onnx) or TorchScript (.pt) model file.")]

InputOpt = Annotated[Optional[list[str]], typer.Option(
    "--input", "-i", help="Input data: FILE (.npz: arrays by input name, shapes as stored; .npy or an image: "
    "the analysed input) or NAME=FILE for one input (repeatable). Inputs without data get seeded random values "
    "(flagged synthetic) of their declared or --shape shape.")]
InputNameOpt = Annotated[Optional[str], typer.Option(
    "--input-name", help="The model input the data feeds / that is analysed (default: the first).")]
OutputNameOpt = Annotated[Optional[str], typer.Option(
    "--output-name", help="The model output (ONNX: any tensor) analysed (default: the first output).")]
WrtOpt = Annotated[Optional[str], typer.Option(
    "--wrt", help="Differentiate with respect to this tensor (an input, or for ONNX an internal tensor, e.g. an "
    "embedding's output).")]
LogitsOpt = Annotated[bool, typer.Option(
    "--logits", help="Use the input of a final Softmax (the logits) as the output: probabilities saturate "
    "gradients.")]

SizeOpt = Annotated[Optional[str], typer.Option("--size", help="Image size: N or HxW (default: the model's "
                                                "declared size).", rich_help_panel=PP)]
MeanOpt = Annotated[Optional[str], typer.Option("--mean", help="Per-channel mean, e.g. 0.485,0.456,0.406.",
                                                rich_help_panel=PP)]
StdOpt = Annotated[Optional[str], typer.Option("--std", help="Per-channel std.", rich_help_panel=PP)]
ScaleOpt = Annotated[Optional[str], typer.Option("--scale", help="Pixel range before mean/std: 0-1 or 0-255.",
                                                 rich_help_panel=PP)]
LayoutOpt = Annotated[Optional[str], typer.Option("--layout", help="NCHW or NHWC (default: from the model).",
                                                  rich_help_panel=PP)]
ChannelsOpt = Annotated[Optional[str], typer.Option("--channels", help="RGB, BGR or L (default: inferred).",
                                                    rich_help_panel=PP)]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="Preprocessing preset: imagenet, minus1to1, "
                                                  "unit, raw, caffe.", rich_help_panel=PP)]
ResizeOpt = Annotated[Optional[str], typer.Option("--resize", help="stretch or crop (shorter side, then centre "
                                                  "crop).", rich_help_panel=PP)]
ShapeOpt = Annotated[Optional[list[str]], typer.Option(
    "--shape", help="Shape of an input without data, batch dim included, used exactly as given: 1,3,48,192 "
    "(the analysed input) or NAME=1,3,48,192 (repeatable). Dynamic dims nothing fixes are an error, except the "
    "batch axis of a synthetic input (1).", rich_help_panel=PP)]

DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.", rich_help_panel=RUN)]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="float32 or float64 (float64 casts model and "
                                                 "inputs).", rich_help_panel=RUN)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for every random choice.", rich_help_panel=RUN)]
MaxMemOpt = Annotated[Optional[str], typer.Option("--max-memory", help="Working memory per chunk, e.g. 512MB, "
                                                  "2GiB (default 1GiB).", rich_help_panel=RUN)]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Inputs per batch.", rich_help_panel=RUN)]
DIST = "Sharding (Ray)"
RayOpt = Annotated[Optional[str], typer.Option(
    "--ray", help="Shard the batches on a Ray cluster: auto (the cluster this machine belongs to), local (one "
    "started for the run), or an address (ray://host:10001, host:6379). Needs pip install 'jacaudit[ray]'. "
    "Env JACAUDIT_RAY.", rich_help_panel=DIST)]
RayWorkersOpt = Annotated[Optional[int], typer.Option(
    "--ray-workers", min=1, help="Ray actors (each loads the model once; default: the cluster's CPUs, or GPUs "
    "with --device cuda).", rich_help_panel=DIST)]
ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Reuse the finished batches in OUT/shards of an interrupted run with the same model, data "
    "and options (refused when they differ).", rich_help_panel=DIST)]
KeepShardsOpt = Annotated[bool, typer.Option(
    "--keep-shards", help="Keep OUT/shards after the report is written (default: removed once the run completes; "
    "an interrupted run always leaves them for --resume).", rich_help_panel=DIST)]


def report_params(command: str) -> list[tuple[str, object, object]]:
    """(parameter name, Annotated type, default) of the report and gate options every command gets."""
    from ..report import formats_help

    return [
        ("out_dir", Annotated[Path, typer.Option("--out", "-o", help="Folder for the reports (and the files "
                                                 "they refer to).", rich_help_panel=GATE)],
         Path(f"jacaudit-{command}")),
        ("formats", Annotated[str, typer.Option("--format", help=f"Reports to write into --out, a comma-separated "
                                                f"list of {formats_help()}; '' for none.", rich_help_panel=GATE)],
         "html,json,md"),
        ("json_out", Annotated[bool, typer.Option("--json", help="Print the report (exactly report.json) on "
                                                  "stdout instead of the summary table.", rich_help_panel=GATE)],
         False),
        ("junit", Annotated[Optional[Path], typer.Option("--junit", help="Also write JUnit XML (one testcase per "
                                                         "check) to this file.", rich_help_panel=GATE)], None),
        ("sarif", Annotated[Optional[Path], typer.Option("--sarif", help="Also write SARIF 2.1.0 (code-scanning "
                                                         "dashboards) to this file.", rich_help_panel=GATE)], None),
        ("fail_on", Annotated[Optional[list[str]], typer.Option(
            "--fail-on", help="Fail threshold NAME[SUBJECT]OP VALUE, e.g. 'flip_rate@eps=0.01>0.05' (ops > >= < "
            "<=; * wildcards; repeat or separate with ';'). Replaces the default fail threshold of the metrics "
            "it matches.", rich_help_panel=GATE)], None),
        ("warn_on", Annotated[Optional[list[str]], typer.Option(
            "--warn-on", help="Warn threshold, same grammar as --fail-on.", rich_help_panel=GATE)], None),
        ("baseline_report", Annotated[Optional[Path], typer.Option(
            "--baseline-report", help="A previous report.json of this command: checks are compared by id "
            "(regressions and improvements listed).", rich_help_panel=GATE)], None),
        ("max_regression", Annotated[Optional[float], typer.Option(
            "--max-regression", min=0.0, help="With --baseline-report: a check (or metric) whose value got "
            "worse by more than this relative amount fails (0.1 = 10%).", rich_help_panel=GATE)], None),
        ("exit_zero", Annotated[bool, typer.Option("--exit-zero", help="Exit 0 even when a check fails (report "
                                                   "only).", rich_help_panel=GATE)], False),
    ]


#: option names (long flags without dashes, underscores) that mean the same in every command that has them:
#: the only keys allowed at the top level of [tool.jacaudit] / as JACAUDIT_<OPTION>. Thresholds, baselines and
#: output files are per command (their table, or JACAUDIT_<COMMAND>_<OPTION>).
SHARED_KEYS = frozenset({
    "input", "input_name", "output_name", "wrt", "logits", "size", "mean", "std", "scale", "layout", "channels",
    "preset", "resize", "shape", "device", "dtype", "seed", "max_memory", "batch_size", "ray", "ray_workers",
    "format", "json", "max_regression", "exit_zero",
})
