"""Shared fixtures: the repository on sys.path, tiny image folders written by the
tests, trained runs shared by every module (`tiny_run`, `dry_run`), and the scripts
(fer.py, predict.py, bench.py, prepare.py, export.py, ...: common.SCRIPTS) run in
this process or in a subprocess. Every helper that runs a script takes its file name
first: `main_in_process("predict.py", face, "--checkpoint", ckpt)`,
`run_script("prepare.py", src, "--out", out)`, `call_main("fer.py", "train", ...)`,
`cli("export.py", ...)` (both ways); `assert_error` checks a refusal's one line, and
`train_cut` leaves a run as Ctrl-C does, for --resume.

`python -m pytest -q` runs the quick tests (under a minute on two cores);
`python -m pytest -q -m slow` runs exactly the ones marked `slow`: long runs,
resume bit-exactness, the data in ../shared, torchrun, and each bad-input case
once more as `python <script>` in a subprocess.
"""
import contextlib
import importlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402  (needs ROOT on sys.path)
import fer  # noqa: E402

# Each script of the repository (common.SCRIPTS: fer.py, predict.py, bench.py,
# prepare.py, export.py, ...) and the module whose main(ARGS) runs it in this process.
SCRIPTS = {script: importlib.import_module(script.removesuffix(".py")) for script in common.SCRIPTS}
CLASSES = ("angry", "happy", "sad")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long runs, resume bit-exactness, ../shared data, torchrun and "
                                       "subprocess runs; deselected unless -m selects them (-m slow)")
    if not config.option.markexpr:  # no -m given: the quick tests only
        config.option.markexpr = "not slow"


def write_faces(root, classes=CLASSES, per_class=8, size=48, seed=0):
    """An ImageFolder of grayscale JPEGs whose classes differ in brightness, so a
    network can learn something in one epoch."""
    g = torch.Generator().manual_seed(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = 40 + 80 * c
            pixels = (torch.randint(0, 40, (size, size), generator=g) + base).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy(), "L").save(root / name / f"{i:03d}.jpg")
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """DIR/train (8 images a class) and DIR/test (4 a class), three classes."""
    root = tmp_path_factory.mktemp("faces")
    write_faces(root / "train", per_class=8, seed=0)
    write_faces(root / "test", per_class=4, seed=1)
    return root


def exit_status(script, args):
    """SCRIPT's main(ARGS) in this process (SCRIPT: "fer.py", "predict.py", ...): its
    exit status, 0 or the one it exits with."""
    try:
        SCRIPTS[script].main([str(a) for a in args])
        return 0
    except SystemExit as e:
        return e.code


def main_in_process(script, *args, cwd=None):
    """SCRIPT's main(ARGS) in this process, as `run_script` runs it in a subprocess
    (one thread unless --threads says otherwise, in `cwd`): (exit status, stdout,
    stderr). An exception other than SystemExit escapes, and fails the test, as a
    traceback would. For fixtures wider than a test, where capsys cannot be used."""
    out, err = io.StringIO(), io.StringIO()
    threads, env, here = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"), os.getcwd()
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = exit_status(script, args)
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
        if env is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = env
    return code, out.getvalue(), err.getvalue()


def assert_error(code, err, *needles, status=2, prog="fer.py"):
    """Exit `status`, no traceback, and one line on stderr, from `prog` (`fer.py
    COMMAND`, `predict.py`, `bench.py`, ...), naming every needle."""
    assert code == status, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.match(re.escape(prog) + r"( [a-z]+)?: (error: |interrupted)", lines[0]), err
    for needle in needles:
        assert str(needle) in err, f"{needle!r} not in {err!r}"


# The networks' settings of the quick runs: the smallest input resnet34 takes.
FAST = ("--model", "resnet34", "--image-size", "32", "--batch-size", "4")


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """One two-epoch run on tiny_data, in this process, one thread: (its --out
    folder, its stdout). Shared by the tests of every module that only read its
    checkpoints; they may add files to the folder, never change the checkpoints.
    --no-amp: bfloat16 autocast on CPU has blown 4-image batches up to NaN weights,
    which is not what the tests that predict with it check."""
    out = tmp_path_factory.mktemp("tiny_run")
    code, stdout, err = main_in_process("fer.py", "train", "--data", tiny_data, *FAST, "--epochs", "2", "--no-amp",
                                        "--threads", "1", "--out", out)
    assert code == 0, err
    return out, stdout


@pytest.fixture(scope="session")
def dry_run(tiny_data, tmp_path_factory):
    """A --dry-run (a whole run of one epoch, its checkpoints marked as a dry run's) on
    tiny_data's train/ alone, with no test/ folder beside it: it shows that train never
    reads the test split, and its checkpoints are the earlier files that a later run in
    the same --out may replace, and must leave intact when it fails. Its --out folder.
    Batches of 7: 3 steps, the fewest onecycle takes (a step costs the same for 4 faces)."""
    root = tmp_path_factory.mktemp("dry_run")
    shutil.copytree(tiny_data / "train", root / "data" / "train")  # no test/ at all
    out = root / "run"
    code, _, err = main_in_process("fer.py", "train", "--data", root / "data", *FAST[:-1], "7", "--dry-run",
                                   "--no-amp", "--threads", "1", "--out", out)
    assert code == 0, err
    return out


def train_cut(*args, epochs_done=1):
    """`fer.py train ARGS` in this process, stopped as Ctrl-C stops it once `epochs_done`
    epochs are saved: a run for --resume to continue (a --dry-run is a whole run of
    one epoch, not the first epoch of a longer one). Returns its stdout."""
    real, epochs = fer.train_one_epoch, []

    def one_epoch(*a, **k):
        epochs.append(len(epochs) + 1)
        if len(epochs) > epochs_done:
            raise KeyboardInterrupt
        return real(*a, **k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fer, "train_one_epoch", one_epoch)
        code, out, err = main_in_process("fer.py", "train", *args)
    assert code == 130 and "--resume" in err, err
    return out


@pytest.fixture
def call_main(capsys, monkeypatch):
    """call_main(SCRIPT, *ARGS): SCRIPT's main(ARGS) in this process, (exit status,
    stdout, stderr). One thread unless --threads says otherwise, as in `run_script`'s
    subprocess: two threads spinning against another process on a busy two-core
    machine run many times slower."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def call(script, *args):
        capsys.readouterr()
        threads = torch.get_num_threads()  # main sets them for its run
        try:
            code = exit_status(script, args)
        finally:
            torch.set_num_threads(threads)
        out, err = capsys.readouterr()
        return code, out, err
    return call


# One thread per test process: the networks are tiny here, and several processes
# spinning on two cores each would mostly wait for one another.
torch.set_num_threads(1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_script(script, *args, cwd=None, timeout=300, env=None):
    """`python SCRIPT ARGS` in a subprocess, as a user runs it (SCRIPT: "fer.py",
    "predict.py", "bench.py" or "prepare.py", from the repository root)."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(params=["in_process", pytest.param("subprocess", marks=pytest.mark.slow)])
def cli(request):
    """cli(SCRIPT, *ARGS), both ways: SCRIPT's main(ARGS) in this process (quick, by
    default) and `python SCRIPT ARGS` in a subprocess (marked slow: starting Python
    and torch costs seconds on a small CPU), so the subprocess also shows the exit
    status and stderr a user sees. Returns (exit status, stdout, stderr)."""
    if request.param == "in_process":
        return main_in_process

    def call(script, *args, cwd=None):
        r = run_script(script, *args, cwd=cwd)
        return r.returncode, r.stdout, r.stderr
    return call
