"""Security: nothing is unpickled (a hostile pickle in a .pt / .npy / .npz never runs), external data only from
inside the model's folder (symlinks out refused), HTML reports escape every string from a model or a file (and
in headless Chromium, when installed, run no script and hold no handler), and no command touches the network.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from jacaudit.cli.main import app
from jacaudit.errors import DataError, ModelLoadError
from jacaudit.models import load

from tests.badinputs import builders as B

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TAB = str(ROOT / "sample_models/tabular/tabular_mlp.onnx")
CSV = str(ROOT / "sample_models/tabular/tabular_heldout.csv")
ARM = str(ROOT / "sample_models/arm/arm.pt")


def _cli(args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200", **(env or {})})


# -- no unpickling ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [B.hostile_legacy_pt, B.hostile_zip_pt, B.hostile_torchscript],
                         ids=["legacy-pickle", "torch-save-zip", "torchscript-constants"])
def test_a_hostile_pt_never_runs(build, tmp_path):
    marker = tmp_path / "PWNED"
    path = build(tmp_path, marker)
    with pytest.raises(ModelLoadError):
        load(str(path))
    r = _cli(["jacobian", path, "--shape", "1,3", "--out", tmp_path / "out"])
    assert r.exit_code == 2, r.output
    assert not marker.exists(), "the pickle ran"
    assert not (tmp_path / "out").exists()


def test_the_hostile_pickle_would_run(tmp_path):
    """The marker works: unpickling the payload (deliberately, here) creates the file."""
    import pickle

    marker = tmp_path / "PWNED"
    pickle.loads(B.hostile_pickle_bytes(marker))
    assert marker.exists()


@pytest.mark.parametrize("build", [B.hostile_npy, B.hostile_npz], ids=["npy", "npz"])
def test_a_hostile_array_file_never_runs(build, tmp_path):
    marker = tmp_path / "PWNED"
    path = build(tmp_path, marker)
    for argv in (["jacobian", TAB, "-i", path], ["saliency", TAB, path, "--method", "grad"],
                 ["robustness", TAB, path, "--eps", "0.1"]):
        r = _cli([*argv, "--out", tmp_path / "out"])
        assert r.exit_code == 2 and "pickled" in r.stderr, (argv, r.output)
    from jacaudit import data as D

    with pytest.raises(DataError):
        D.load_arrays(str(path))
    assert not marker.exists(), "the pickle ran"


def test_checkpoints_are_named_not_loaded(tmp_path):
    for build, what in ((B.state_dict, "torch.save"), (B.pickled_module, "torch.save"),
                        (B.torch_package, "torch.package")):
        with pytest.raises(ModelLoadError, match=what.replace(".", r"\.")):
            load(str(build(tmp_path)))


# -- external data ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [B.external_outside, B.external_absolute, B.external_symlink],
                         ids=["dot-dot", "absolute", "symlink-out"])
def test_external_data_outside_the_model_folder_is_refused(build, tmp_path):
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load(str(build(tmp_path)))


def test_external_data_inside_the_folder_loads(tmp_path):
    m = load(str(B.external_ok(tmp_path)))
    y = m.run({"x": torch.ones(1, 4)})[0]
    assert y.shape == (1, 2)


# -- HTML reports escape model and file strings -------------------------------------------------------------------
ACTIVE = '<script>document.title="PWNED"</script><img src=x onerror="document.title=\'PWNED\'">'


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def _assert_inert(html: str):
    p = _Tags()
    p.feed(html)
    names = [t for t, _ in p.tags]
    assert "script" not in names, "a <script> element in the report"
    handlers = [(t, a) for t, a in p.tags for k in a if k.lower().startswith("on")]
    assert not handlers, handlers
    for t, a in p.tags:
        if t == "img":
            assert (a.get("src") or "").startswith("data:"), a
    assert p.title.strip() != "PWNED"  # a script that ran would have set it


@pytest.fixture(scope="module")
def xss_reports(tmp_path_factory):
    """report.html of saliency (labels from labels.txt beside the model) and inspect --tensors on a model
    whose doc string, metadata, producer, graph/node/tensor names and labels hold active HTML."""
    d = tmp_path_factory.mktemp("xss")
    model = B.html_model(d / "model", XSS=ACTIVE)
    img = B.image(d / "imgs", f"pic{'<b onclick=x>'}.png")
    pages = {}
    for name, argv in (("saliency", ["saliency", model, img, "--method", "grad"]),
                       ("inspect", ["inspect", model, "--tensors"])):
        r = _cli([*argv, "--out", d / name, "--format", "html,json"])
        assert r.exit_code == 0, r.output
        pages[name] = d / name / "report.html"
    re_rendered = d / "rendered.html"
    r = _cli(["render", d / "saliency" / "report.json", "--out", re_rendered])
    assert r.exit_code == 0, r.output
    pages["render"] = re_rendered
    return pages


@pytest.mark.parametrize("which", ["saliency", "inspect", "render"])
def test_html_reports_escape_every_model_string(xss_reports, which):
    html = xss_reports[which].read_text()
    _assert_inert(html)
    assert "&lt;script&gt;" in html  # the planted text is shown, escaped
    if which != "inspect":
        assert "cat&lt;script&gt;" in html  # the label from labels.txt


def test_a_hostile_report_json_renders_inert(tmp_path):
    """`jacaudit render` on a report.json someone else wrote: its strings are data too."""
    d = json.loads((ROOT / "tests/data/inspect-report-1.0.json").read_text())
    d["command_line"] = [*d["command_line"], ACTIVE]
    d["model"].update(path=ACTIVE, name=ACTIVE, producer=ACTIVE)
    d["model"]["inputs"][0]["name"] = ACTIVE
    d["environment"]["platform"] = ACTIVE
    d["warnings"] = [ACTIVE]
    d["settings"] = {"note": ACTIVE}
    d["result"].update(path=ACTIVE, producer=ACTIVE)
    d["result"]["inputs"][0]["name"] = ACTIVE
    d["result"]["outputs"][0]["name"] = ACTIVE
    d["result"]["op_histogram"][0]["op_type"] = ACTIVE
    (tmp_path / "evil.json").write_text(json.dumps(d))
    r = _cli(["render", tmp_path / "evil.json", "--out", tmp_path / "evil.html"])
    assert r.exit_code == 0, r.output
    html = (tmp_path / "evil.html").read_text()
    _assert_inert(html)
    assert html.count("&lt;script&gt;") >= 3


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                None)


def _dom(page: Path, tmp: Path) -> str:
    """The DOM headless Chromium holds after loading ``page`` (scripts, had any run, have run)."""
    profile = tempfile.mkdtemp(dir=tmp)
    p = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--virtual-time-budget=2000", "--dump-dom",
                        "file://" + str(page)], capture_output=True, text=True, timeout=90)
    assert "<body" in p.stdout, p.stderr[-2000:]
    return p.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_html_report_runs_no_script_in_chromium(xss_reports, tmp_path):
    """Headless Chromium's DOM after load: the title is not PWNED (no script or handler ran), and no element of
    the live DOM carries an event handler. The control page shows the check catches a script that runs."""
    _assert_inert(_dom(xss_reports["saliency"], tmp_path))
    control = tmp_path / "control.html"
    control.write_text("<html><head><title>t</title></head><body>" + ACTIVE + "</body></html>")
    seen = _Tags()
    seen.feed(_dom(control, tmp_path))
    assert seen.title.strip() == "PWNED"  # the planted script does run in a page that does not escape it


# -- no network at run time ---------------------------------------------------------------------------------------
COMMANDS = {
    "inspect": ["inspect", TAB],
    "saliency": ["saliency", TAB, "{small_csv}", "--method", "grad"],
    "robustness": ["robustness", TAB, CSV, "--eps", "0.1", "--limit", "8", "--pgd-steps", "2", "--bisect", "2"],
    "transfer": ["transfer", TAB, CSV, "--limit", "8"],
    "geometry": ["geometry", ARM, "--shape", "1,3"],
    "gradflow": ["gradflow", TAB],
    "jacobian": ["jacobian", TAB],
    "verify": ["verify", TAB, "-k", "1"],
}


@pytest.fixture
def no_network(monkeypatch):
    attempts: list = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError("network access is blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    return attempts


@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_every_command_runs_without_network(cmd, no_network, tmp_path):
    small = tmp_path / "small.csv"
    small.write_text("".join(open(CSV).readlines()[:4]))
    argv = [str(small) if a == "{small_csv}" else a for a in COMMANDS[cmd]]
    r = _cli([*argv, "--out", tmp_path / "out", "--format", "html,json"])
    assert r.exit_code in (0, 1, 4), r.output
    assert (tmp_path / "out" / "report.html").is_file()
    assert no_network == [], no_network
    if cmd == "jacobian":
        r = _cli(["render", tmp_path / "out" / "report.json", "--out", tmp_path / "r.md"])
        assert r.exit_code == 0 and no_network == [], r.output
        r = _cli(["schema"])
        assert r.exit_code == 0 and json.loads(r.stdout) and no_network == [], r.output
