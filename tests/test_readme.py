"""The README cannot drift from the tool: its examples are run and their output compared, and its generated
operator list is compared with the registry.

Examples: every fenced ```console block right after a ``<!-- readme-test -->`` line. In a block, a line
``$ jacaudit ARGS`` is a command (run as ``python -m jacaudit ARGS``, split like a shell); the lines up to the next
``$`` line are its expected stdout (messages go to stderr and are not shown). The commands run in order, in one
fresh folder holding a link to the repository's ``sample_models/`` (so a later command may read what an earlier
one wrote, e.g. ``jacaudit-jacobian/report.json``, and nothing is written into the checkout), with
``JACAUDIT_THREADS=1``. Each must exit 0 unless ``# exit N`` ends its line.

Comparison, after this normalisation of both sides (nothing else is ignored):

* trailing spaces are dropped, and runs of spaces and runs of one box-drawing character (``━━━``) count as one:
  a table's column widths follow its widest cell;
* numbers compare by value, equal within a relative 1e-3 (float noise between torch builds, thread counts and
  CPUs; the README may show a long float shortened), and any two numbers below 1e-12 in magnitude are equal
  (round-off such as an adjoint error of 4.7e-17); the text around them must be identical;
* a line ``...`` stands for any number of lines left out (abridged output); a line ending in `` ...`` matches any
  line that starts with what precedes it (a long line cut short).

Timings and absolute paths do not occur on stdout (the commands take relative paths), so nothing else is masked.
``python tests/test_readme.py`` prints every example's actual output (to update the README after a real change).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARK = "<!-- readme-test -->"
RTOL, TINY = 1e-3, 1e-12
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
BOX_RUNS = re.compile(r"([\u2500-\u257f])\1+")


@dataclass
class Example:
    line: int  # README line of the command
    argv: list[str]
    code: int
    expected: list[str] = field(default_factory=list)


def examples(text: str | None = None) -> list[Example]:
    """The README's tested console blocks, as commands with their expected output."""
    lines = (README.read_text(encoding="utf-8") if text is None else text).splitlines()
    found: list[Example] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != MARK:
            i += 1
            continue
        if i + 1 >= len(lines) or lines[i + 1].strip() != "```console":
            raise ValueError(f"README.md:{i + 1}: {MARK} must be followed by a ```console block")
        i += 2
        current = None
        while i < len(lines) and lines[i].strip() != "```":
            ln = lines[i]
            if ln.startswith("$ "):
                cmd, _, tail = ln[2:].partition("# exit ")
                argv = shlex.split(cmd)
                if not argv or argv[0] != "jacaudit":
                    raise ValueError(f"README.md:{i + 1}: a tested command starts with 'jacaudit'")
                current = Example(i + 1, argv[1:], int(tail) if tail else 0)
                found.append(current)
            elif current is None:
                raise ValueError(f"README.md:{i + 1}: output before the first '$ jacaudit' line")
            else:
                current.expected.append(ln)
            i += 1
        if i >= len(lines):
            raise ValueError("README.md: an unclosed ```console block")
    return found


def _norm(line: str) -> str:
    return re.sub(r" +", " ", BOX_RUNS.sub(r"\1", line.rstrip()))


def _tokens(line: str) -> list[str | float]:
    """Text and numbers, alternating as they occur."""
    out: list[str | float] = []
    pos = 0
    for m in NUMBER.finditer(line):
        out.append(line[pos:m.start()])
        out.append(float(m.group()))
        pos = m.end()
    out.append(line[pos:])
    return out


def _num_eq(a: float, b: float) -> bool:
    return (abs(a) < TINY and abs(b) < TINY) or abs(a - b) <= RTOL * max(abs(a), abs(b))


def line_matches(expected: str, actual: str) -> bool:
    exp, act = _norm(expected), _norm(actual)
    prefix = exp.endswith(" ...")
    if prefix:
        exp = exp[:-4]
    e, a = _tokens(exp), _tokens(act)
    if prefix:
        # the actual line may go on: compare up to the expected's last (text) token, which may be cut short
        if len(a) < len(e):
            return False
        last = e[-1]
        return all(_tok_eq(x, y) for x, y in zip(e[:-1], a)) and isinstance(a[len(e) - 1], str) and \
            a[len(e) - 1].startswith(last)  # type: ignore[union-attr]
    return len(e) == len(a) and all(_tok_eq(x, y) for x, y in zip(e, a))


def _tok_eq(x, y) -> bool:
    if isinstance(x, float) and isinstance(y, float):
        return _num_eq(x, y)
    return x == y


def output_matches(expected: list[str], actual: list[str]) -> bool:
    """``expected`` (with ``...`` lines) against ``actual``, line by line."""
    memo: dict[tuple[int, int], bool] = {}

    def go(i: int, j: int) -> bool:
        if (i, j) in memo:
            return memo[(i, j)]
        if i == len(expected):
            ok = j == len(actual)
        elif expected[i].strip() == "...":
            ok = any(go(i + 1, k) for k in range(j, len(actual) + 1))
        else:
            ok = j < len(actual) and line_matches(expected[i], actual[j]) and go(i + 1, j + 1)
        memo[(i, j)] = ok
        return ok

    return go(0, 0)


def first_difference(expected: list[str], actual: list[str]) -> str:
    """A readable hint: the first expected line (not '...') that no actual line matches."""
    for ln in expected:
        if ln.strip() != "..." and not any(line_matches(ln, a) for a in actual):
            return f"no output line matches: {ln!r}"
    return "the lines match one by one but not in this order or count"


def run(ex: Example, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JACAUDIT_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in [k for k in env if k.startswith("JACAUDIT_") and k != "JACAUDIT_THREADS"]:
        env.pop(k)  # a JACAUDIT_<OPTION> of the caller's shell would change the output
    env.pop("GITHUB_STEP_SUMMARY", None)
    return subprocess.run([sys.executable, "-m", "jacaudit", *ex.argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("readme")
    (d / "sample_models").symlink_to(ROOT / "sample_models", target_is_directory=True)
    return d


EXAMPLES = examples()


def test_the_readme_has_an_example_of_every_command():
    from jacaudit.cli.main import COMMANDS

    shown = {ex.argv[0] for ex in EXAMPLES}
    assert shown == {m.removesuffix("_cmd") for m in COMMANDS}, shown
    assert all(ex.expected for ex in EXAMPLES), [ex.line for ex in EXAMPLES if not ex.expected]


@pytest.mark.parametrize("ex", EXAMPLES, ids=[f"L{ex.line}-{ex.argv[0]}" for ex in EXAMPLES])
def test_readme_example_output(ex, workdir):
    p = run(ex, workdir)
    assert p.returncode == ex.code, f"README.md:{ex.line}: exit {p.returncode}, expected {ex.code}\n{p.stderr}"
    actual = p.stdout.splitlines()
    assert output_matches(ex.expected, actual), (
        f"README.md:{ex.line}: `jacaudit {shlex.join(ex.argv)}` prints something else "
        f"({first_difference(ex.expected, actual)}); its output now:\n" + p.stdout)


def test_the_comparison_is_strict_where_it_should_be():
    """The normalisation forgives column widths and float noise, not edits."""
    exp = ["status: PASS (5 pass)", "...", " 0    onnxruntime  pass    2.28e-05   0.00248 "]
    act = ["status: PASS (5 pass)", "x", "y", " 0 onnxruntime pass 2.2800001e-05 0.00248"]
    assert output_matches(exp, act)
    assert not output_matches(exp, act[:1])                                   # a line missing
    assert not output_matches(["status: PASS (4 pass)"], ["status: PASS (5 pass)"])  # a number edited
    assert not output_matches(["status: FAIL (5 pass)"], ["status: PASS (5 pass)"])  # a word edited
    assert not output_matches(["a 0.973"], ["a 0.975"])                       # beyond 1e-3
    assert output_matches(["a 0.973"], ["a 0.97300004"]) and output_matches(["e 4.67e-17"], ["e 1.2e-16"])
    assert not output_matches(["a", "b"], ["a", "b", "c"])                     # extra output needs a '...'
    assert output_matches(["┏━━┳━┓ x"], ["┏━━━━━┳━━┓ x"])
    assert line_matches("PASS  forward_rel_error  model  forward_rel_ ...",
                        "PASS forward_rel_error model forward_rel_error = 4.1e-08 <= fail threshold 0.0001")
    assert not line_matches("PASS  adjoint ...", "PASS forward_rel_error model")


def test_the_examples_parse(tmp_path):
    text = f"x\n{MARK}\n```console\n$ jacaudit schema --list  # exit 0\ngeometry\n...\n```\n"
    [ex] = examples(text)
    assert ex.argv == ["schema", "--list"] and ex.code == 0 and ex.expected == ["geometry", "..."]
    with pytest.raises(ValueError):
        examples(f"{MARK}\n```bash\n$ jacaudit ops\n```\n")
    with pytest.raises(ValueError):
        examples(f"{MARK}\n```console\n$ python -m jacaudit ops\n```\n")


def test_the_operator_list_matches_the_registry():
    """README's "Supported ONNX operators" block is what scripts/gen_readme_ops.py makes from the registry."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_readme_ops
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    from jacaudit.cli.ops_cmd import collect

    text = README.read_text(encoding="utf-8")
    assert gen_readme_ops.rewrite(text, gen_readme_ops.block(collect())) == text, \
        "README.md's operator list is out of date: run python scripts/gen_readme_ops.py"
    listed = text.split(gen_readme_ops.BEGIN)[1].split(gen_readme_ops.END)[0]
    assert "Conv, ConvTranspose" in listed and "MaxRoiPool" in listed.split("not implemented")[1]
    assert "ConvInteger" not in listed.split("**refused**")[0]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sample_models").symlink_to(ROOT / "sample_models", target_is_directory=True)
        for ex in EXAMPLES:
            p = run(ex, Path(tmp))
            print(f"$ jacaudit {shlex.join(ex.argv)}  (README.md:{ex.line}, exit {p.returncode})")
            print(p.stdout, end="")
