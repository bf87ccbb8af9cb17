"""Shared fixtures: the repository on sys.path and tiny image folders written by the tests."""
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


@pytest.fixture
def fer_main(capsys):
    """fer.main(ARGS) in this process: (exit status, stdout, stderr)."""
    def call(*args):
        capsys.readouterr()
        threads = torch.get_num_threads()  # fer.main sets them for its run
        try:
            fer.main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
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
