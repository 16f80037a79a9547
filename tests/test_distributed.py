"""Dataset audits in batches (issue 15): resumable shards, Ray sharding with the single-process answer.

Without Ray (default suite): the shard files round-trip every value exactly; an interrupted run (the process
killed with SIGKILL after its first shards) leaves no report, and ``--resume`` then gives the same report as an
uninterrupted run; ``--resume`` refuses another run's shards; ``--ray`` without the extra is one line, exit 2;
nothing imports Ray without ``--ray``.

With Ray (marker ``ray``; .ci/run installs the extra and runs them): a local cluster started by the test
(``ray.init(num_cpus=2)``) or by the command (``--ray local``); the sharded reports equal the single-process
ones on the sample robust / brittle pair under one gate (same checks, same exit codes) and on data with a corrupt
image (that input's error, the rest computed); a worker process killed mid-run (SIGKILL) is restarted by Ray and
the report is still complete and equal.

"Equal" means the whole report.json apart from ``timings``, ``created`` and ``command_line``, plus every artifact
file byte for byte.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SM = ROOT / "sample_models"
GATE = SM / "robust/gate.toml"
DATA = SM / "robust/data"
ROBUST, BRITTLE = SM / "robust/robust_cnn.onnx", SM / "shapes/shapes_cnn.onnx"
FAST = ["--eps", "0.003,0.01", "--pgd-steps", "4", "--bisect", "2", "--norm-limit", "12", "--directions", "1",
        "--worst", "2", "--batch-size", "8", "--limit", "32"]
VOLATILE = ("timings", "created", "command_line")


def _cli(*args, cwd=None, env=None, timeout=300):
    e = dict(os.environ, **(env or {}))
    e.setdefault("JACAUDIT_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "jacaudit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=e, timeout=timeout)


def _report(out: Path) -> dict:
    rep = json.loads((out / "report.json").read_text())
    for k in VOLATILE:
        rep.pop(k, None)
    return rep


def _artifacts(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.npy"))}


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = _report(a), _report(b)
    diff = [k for k in set(ra) | set(rb) if ra.get(k) != rb.get(k)]
    assert not diff, f"reports differ in {diff}"
    fa, fb = _artifacts(a), _artifacts(b)
    assert fa and sorted(fa) == sorted(fb)
    assert all(fa[k] == fb[k] for k in fa)


# ---------------------------------------------------------------------------------------------------------
# Without Ray
# ---------------------------------------------------------------------------------------------------------
def test_shard_encoding_round_trips_every_value():
    import numpy as np

    from jacaudit.distributed.shards import decode_record, encode_record

    rec = {"slot0": 8, "m0": [0.1 + 0.2, float.fromhex("0x1.fffffep+127"), 5e-324, float("nan"), -0.0],
           "fd": [[1.0, None], None], "names": ["a<b>", "ü"], "arrays": {"adv0": np.arange(6, dtype=np.float32)}}
    back = decode_record(*encode_record(rec))
    assert back["m0"][:3] == rec["m0"][:3] and back["m0"][3] != back["m0"][3] and str(back["m0"][4]) == "-0.0"
    assert back["fd"] == rec["fd"] and back["names"] == rec["names"]
    assert back["arrays"]["adv0"].dtype == np.float32 and np.array_equal(back["arrays"]["adv0"], np.arange(6))


def test_interrupted_run_leaves_no_report_and_resume_gives_the_same_report(tmp_path):
    ref = tmp_path / "ref"
    r = _cli("robustness", ROBUST, DATA, "--out", ref, "--format", "json", *FAST)
    assert r.returncode == 0, r.stderr
    # an earlier, complete report in the folder the interrupted run uses: it must not survive as if current
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    assert not (out / "shards").exists()                 # the completed reference run removed its shards
    env = dict(os.environ, JACAUDIT_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "jacaudit", "robustness", str(ROBUST), str(DATA), "--out", str(out),
                          "--format", "json", *FAST], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (out / "shards" / "batch-000001.json").exists():
            time.sleep(0.05)
        assert p.poll() is None, "the run finished before it could be interrupted"
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    done = sorted(f.name for f in (out / "shards").glob("batch-*.json"))
    assert 2 <= len(done) < 4, done
    assert not (out / "report.json").exists()            # no report that looks complete
    r = _cli("robustness", ROBUST, DATA, "--out", out, "--format", "json", *FAST, "--resume", "--keep-shards")
    assert r.returncode == 0, r.stderr
    assert f"--resume: {len(done)} of 4 batch(es) reused" in r.stderr
    assert_same_run(ref, out)
    # another run's shards are refused (one line, exit 2), naming what differs
    r = _cli("robustness", ROBUST, DATA, "--out", out, "--format", "json", *FAST[:-2], "--limit", "24", "--resume")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "made by another run" in r.stderr and "data" in r.stderr
    # a completed run removes its shards (unless --keep-shards); the report stays
    r = _cli("robustness", ROBUST, DATA, "--out", out, "--format", "json", *FAST)
    assert r.returncode == 0 and not (out / "shards").exists() and (out / "report.json").exists(), r.stderr


def test_ctrl_c_is_one_line_that_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    # SIGINT at its default in the child: a shell that starts a job in the background without job control
    # hands it SIGINT ignored (POSIX), and Python then leaves Ctrl-C ignored too (a CI run started that way
    # finished the audit with exit 0)
    p = subprocess.Popen([sys.executable, "-m", "jacaudit", "robustness", str(ROBUST), str(DATA), "--out", str(out),
                          "--format", "json", *FAST], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, JACAUDIT_THREADS="1"),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (out / "shards" / "batch-000000.json").exists():
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    lines = err.strip().splitlines()
    assert p.returncode == 130 and len(lines) == 1, err
    assert lines[0].startswith("interrupted; ") and "of 4 batch(es) kept in" in lines[0] and "--resume" in lines[0]
    assert not (out / "report.json").exists()


def test_ray_missing_extra_is_one_line_exit_2(tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"
            "from jacaudit.cli.main import main\n"
            f"sys.argv = ['jacaudit', 'robustness', {str(ROBUST)!r}, {str(DATA)!r}, '--ray', 'local', "
            f"'--out', {str(tmp_path / 'o')!r}]\n"
            "main()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: --ray needs Ray, an optional extra: pip install 'jacaudit[ray]' (or pip install 'ray[data]')"]
    assert not (tmp_path / "o").exists()
    r = _cli("robustness", ROBUST, DATA, "--ray-workers", "2", "--out", tmp_path / "o")
    assert r.returncode == 2 and "--ray-workers needs --ray" in r.stderr


def test_nothing_imports_ray_without_the_option(tmp_path):
    code = ("import sys\n"
            "from jacaudit.cli.main import main\n"
            f"sys.argv = ['jacaudit', 'robustness', {str(ROBUST)!r}, {str(DATA)!r}, '--limit', '4', '--eps', "
            f"'0.01', '--pgd-steps', '1', '--norm-limit', '1', '--out', {str(tmp_path / 'o')!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def _npz_shards(tmp_path):
    """The 64 labelled held-out images of the sample card as 4 .npz shards of 16 (x, y), and as one .npz."""
    import numpy as np

    from jacaudit.samples.shapes import make_images, to_tensor

    d = make_images(64, 0, "heldout")
    x, y = to_tensor(d["images"]).astype(np.float32), d["labels"]
    folder = tmp_path / "shards_in"
    folder.mkdir()
    for k in range(4):
        np.savez(folder / f"part-{k}.npz", x=x[16 * k:16 * (k + 1)], y=y[16 * k:16 * (k + 1)])
    np.savez(tmp_path / "one.npz", x=x, y=y)
    return folder, tmp_path / "one.npz"


def test_a_folder_of_npz_shards_is_read_per_batch_and_measures_what_one_npz_does(tmp_path):
    folder, one = _npz_shards(tmp_path)
    args = ["--format", "json", "--no-random-start", "--eps", "0.003,0.01", "--pgd-steps", "3", "--bisect", "1",
            "--norm-limit", "4", "--batch-size", "8"]
    a, b = tmp_path / "a", tmp_path / "b"
    for data, out in ((folder, a), (one, b)):
        r = _cli("robustness", BRITTLE, data, "--out", out, *args)
        assert r.returncode == 0, r.stderr
    ra, rb = _report(a)["result"], _report(b)["result"]
    assert ra["labels_source"] == "the shards' y arrays" and ra["n_inputs"] == 64
    assert [i["name"] for i in ra["inputs"][:2]] == ["part-0.npz[0]", "part-0.npz[1]"]
    # the same samples in the same batches: every sweep number is the same
    assert ra["sweep"] == rb["sweep"] and ra["clean_accuracy"] == rb["clean_accuracy"]
    assert [i["label"] for i in ra["inputs"]] == [i["label"] for i in rb["inputs"]]


# ---------------------------------------------------------------------------------------------------------
# With Ray (a local cluster)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="the Ray extra is not installed (pip install 'jacaudit[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def _in_process(*args):
    from typer.testing import CliRunner

    from jacaudit.cli.main import app

    return CliRunner().invoke(app, [*map(str, args)])


@pytest.mark.ray
def test_sharded_reports_equal_single_process_on_the_robust_brittle_pair(ray_cluster, tmp_path):
    for model, code in ((ROBUST, 0), (BRITTLE, 1)):
        one, shard = tmp_path / f"{model.stem}-one", tmp_path / f"{model.stem}-ray"
        r1 = _in_process("--config", GATE, "robustness", model, DATA, "--out", one, "--format", "json,html", *FAST)
        r2 = _in_process("--config", GATE, "robustness", model, DATA, "--out", shard, "--format", "json,html", *FAST,
                         "--ray", "auto", "--ray-workers", "2", "--keep-shards")
        assert (r1.exit_code, r2.exit_code) == (code, code), (r1.output[-1500:], r2.output[-1500:])
        assert "Ray workers: " in r2.output and r2.output.count("input(s) in") == 2   # two workers did work
        assert_same_run(one, shard)
        shards = sorted(f.name for f in (shard / "shards").glob("batch-*.json"))
        assert len(shards) == 4


@pytest.mark.ray
def test_sharded_saliency_equals_single_process_with_the_sanity_test(ray_cluster, tmp_path):
    model, images = SM / "shortcut/shortcut_cnn.onnx", SM / "shortcut/examples"
    args = ["saliency", model, images, "--method", "all", "--sg-samples", "4", "--ig-steps", "8", "--sanity",
            "--batch-size", "2", "--format", "json,html"]
    one, shard = tmp_path / "one", tmp_path / "ray"
    r1 = _in_process(*args, "--out", one)
    r2 = _in_process(*args, "--out", shard, "--ray", "auto", "--ray-workers", "2")
    assert r1.exit_code == r2.exit_code and r1.exit_code in (0, 1), (r1.output[-1500:], r2.output[-1500:])
    rep = _report(shard)
    assert len(rep["result"]["inputs"]) == len(list(images.glob("*.png"))) - len(list(images.glob("*_mask.png")))
    assert rep["result"]["sanity"], "the sanity test ran"
    assert_same_run(one, shard)
    pngs = lambda d: {str(p.relative_to(d)): p.read_bytes() for p in sorted((d / "maps").glob("*.png"))}  # noqa: E731
    assert pngs(one) and pngs(one) == pngs(shard)


@pytest.mark.ray
def test_npz_shards_read_on_the_workers_give_the_single_process_report(ray_cluster, tmp_path):
    folder, _ = _npz_shards(tmp_path)
    args = ["robustness", BRITTLE, folder, "--format", "json", *FAST]
    one, shard = tmp_path / "one", tmp_path / "ray"
    r1 = _in_process(*args, "--out", one)
    r2 = _in_process(*args, "--out", shard, "--ray", "auto", "--ray-workers", "2")
    assert r1.exit_code == r2.exit_code == 0, (r1.output[-1500:], r2.output[-1500:])
    assert_same_run(one, shard)


@pytest.mark.ray
def test_a_corrupt_image_is_that_inputs_error_sharded_as_in_one_process(ray_cluster, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    (data / "circle" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png" * 20)
    one, shard = tmp_path / "one", tmp_path / "ray"
    args = ["robustness", ROBUST, data, "--format", "json", *FAST[:-2]]
    r1 = _in_process(*args, "--out", one)
    r2 = _in_process(*args, "--out", shard, "--ray", "auto", "--ray-workers", "2")
    assert r1.exit_code == r2.exit_code == 2, (r1.output[-1500:], r2.output[-1500:])   # partial: an input failed
    rep = _report(shard)
    assert [f["path"] for f in rep["result"]["failures"]] == [str(data / "circle" / "zz_corrupt.png")]
    assert rep["result"]["n_inputs"] == len(list(DATA.rglob("*.png")))
    assert_same_run(one, shard)


@pytest.mark.ray
@pytest.mark.parametrize("address,says", [("127.0.0.1:1", "nothing answers at 127.0.0.1:1"),
                                          ("ray://127.0.0.1:1", "nothing answers at 127.0.0.1:1"),
                                          ("garbage", "give auto, local, host:port or ray://host:port")])
def test_an_unreachable_cluster_is_one_line_exit_2_and_no_out(tmp_path, address, says):
    pytest.importorskip("ray", reason="the Ray extra is not installed (pip install 'jacaudit[ray]')")
    r = _cli("robustness", ROBUST, DATA, "--limit", "4", "--ray", address, "--out", tmp_path / "o", timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.ray
def test_a_killed_worker_is_retried_and_the_report_is_complete_and_equal(tmp_path):
    pytest.importorskip("ray", reason="the Ray extra is not installed (pip install 'jacaudit[ray]')")
    ref = tmp_path / "ref"
    r = _cli("robustness", ROBUST, DATA, "--out", ref, "--format", "json", *FAST)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "ray"
    env = dict(os.environ, JACAUDIT_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "jacaudit", "robustness", str(ROBUST), str(DATA), "--out", str(out),
                          "--format", "json", *FAST, "--ray", "local", "--ray-workers", "2", "--keep-shards"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    killed = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and killed is None and p.poll() is None:
            if (out / "shards" / "batch-000000.json").exists():
                ps = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
                pids = [int(line.split()[0]) for line in ps.splitlines() if "ray::MapWorker" in line]
                if pids:
                    killed = pids[0]
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        stdout, stderr = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert killed is not None, "no Ray worker process was found to kill"
    assert p.returncode == 0, stderr[-3000:]
    assert len(sorted((out / "shards").glob("batch-*.json"))) == 4
    assert_same_run(ref, out)
