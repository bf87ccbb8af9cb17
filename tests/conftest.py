"""Shared fixtures: the repository on sys.path, tiny image folders written by the
tests, and fer.py run in this process or in a subprocess.

`python -m pytest -q` runs the quick tests (under a minute on two cores);
`python -m pytest -q -m slow` runs exactly the ones marked `slow`: long runs,
resume bit-exactness, the data in ../shared, torchrun, and each bad-input case
once more as `python fer.py` in a subprocess.
"""
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fer  # noqa: E402  (needs ROOT on sys.path)

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


def exit_status(args):
    """fer.main(ARGS)'s exit status: 0, or the one it exits with."""
    try:
        fer.main([str(a) for a in args])
        return 0
    except SystemExit as e:
        return e.code


def main_in_process(*args, cwd=None):
    """fer.main(ARGS) in this process, as `run_fer` runs it in a subprocess (one
    thread unless --threads says otherwise, in `cwd`): (exit status, stdout,
    stderr). An exception other than SystemExit escapes, and fails the test, as a
    traceback would. For fixtures wider than a test, where capsys cannot be used."""
    out, err = io.StringIO(), io.StringIO()
    threads, env, here = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"), os.getcwd()
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = exit_status(args)
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
        if env is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = env
    return code, out.getvalue(), err.getvalue()


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
    code, stdout, err = main_in_process("train", "--data", tiny_data, *FAST, "--epochs", "2", "--no-amp",
                                        "--threads", "1", "--out", out)
    assert code == 0, err
    return out, stdout


@pytest.fixture
def fer_main(capsys, monkeypatch):
    """fer.main(ARGS) in this process: (exit status, stdout, stderr). One thread
    unless --threads says otherwise, as in `run_fer`'s subprocess: two threads
    spinning against another process on a busy two-core machine run many times slower."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def call(*args):
        capsys.readouterr()
        threads = torch.get_num_threads()  # fer.main sets them for its run
        try:
            code = exit_status(args)
        finally:
            torch.set_num_threads(threads)
        out, err = capsys.readouterr()
        return code, out, err
    return call


# One thread per test process: the networks are tiny here, and several processes
# spinning on two cores each would mostly wait for one another.
torch.set_num_threads(1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_fer(*args, cwd=None, timeout=300):
    """`python fer.py ARGS` in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "fer.py"), *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(params=["in_process", pytest.param("subprocess", marks=pytest.mark.slow)])
def fer_cli(request):
    """fer.py ARGS, both ways: in this process (quick, by default) and as `python
    fer.py` in a subprocess (marked slow: starting Python and torch costs seconds on
    a small CPU), so the subprocess also shows the exit status and stderr a user
    sees. Returns (exit status, stdout, stderr)."""
    if request.param == "in_process":
        return main_in_process

    def call(*args, cwd=None):
        r = run_fer(*args, cwd=cwd)
        return r.returncode, r.stdout, r.stderr
    return call
