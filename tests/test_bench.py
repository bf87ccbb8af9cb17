"""bench.py: training and inference images/s of the report's pipeline and ours, and
the network alone; its refusals (a size too small for the network) come before
anything is built. The precision it reports is checked in test_runtime.py."""
import re

import pytest

import runtime
from conftest import FAST, assert_error, main_in_process


@pytest.mark.slow  # builds and trains the network four to six times
def test_bench_prints_figures(tiny_data):
    code, stdout, err = main_in_process("bench.py", *FAST, "--report-size", "32", "--steps", "1", "--data", tiny_data,
                                        "--workers", "0")
    assert code == 0, err
    rows = re.findall(r"(\d+)px +(\w+) +channels_last=(\w+) +train +[\d.]+ img/s +infer +[\d.]+ img/s", stdout)
    # the report's and ours at 32 px, then every precision x layout pair at 32 px: 2 x 2, or 1 x 2
    # where the CPU has no bfloat16 instructions
    assert rows[:2] == [("32", "float32", "False"), ("32", rows[-1][1], rows[-1][2])]
    assert len(rows) == 2 + len(set(rows[2:])) and len(rows) in (4, 6)
    assert ("32", "float32", "False") in rows[2:] and ("32", "float32", "True") in rows[2:]
    assert "threads" in stdout and "x training" in stdout
    assert re.search(r"^training precision: (bfloat16 autocast|float32) \(", stdout, re.M)
    if runtime.pick_device("auto") == "cpu" and runtime.cpu_flags() is not None:
        assert "AVX2 " in stdout and "AVX512-BF16 " in stdout and "PyTorch's CPU kernels: " in stdout
    alone = re.search(r"the network alone +32px +(\w+) +channels_last=(\w+) +train +([\d.]+) img/s", stdout)
    assert alone and alone.groups()[:2] == rows[-1][1:]  # in training's precision and layout
    assert re.search(r"ours / the network alone: \d+\.\d\d", stdout)


def test_bench_names_the_size_option_that_is_too_small(call_main):
    """bench has two sizes; the error names the one at fault, before anything is built."""
    code, out, err = call_main("bench.py", "--model", "alexnet", "--report-size", "48")
    assert_error(code, err, "--report-size 48 is below alexnet's minimum of 63", "--report-size 63", prog="bench.py")
    assert out == ""  # not even the header: nothing was set up
    code, _, err = call_main("bench.py", "--model", "alexnet", "--image-size", "32")
    assert_error(code, err, "--image-size 32 is below alexnet's minimum of 63", "--image-size 63", prog="bench.py")


@pytest.mark.parametrize("options, needle", [
    (("--steps", "0"), "--steps: 0 is out of range (must be >= 1)"),
    (("--workers", "-1"), "--workers: -1 is out of range (must be >= 0)"),
    (("--model", "resnet18"), "--model: invalid choice: 'resnet18'"),
    (("--recipe", "ours"), "unrecognized arguments: --recipe ours"),
])
def test_bench_options_are_checked_before_any_work(options, needle, call_main):
    code, out, err = call_main("bench.py", *options)
    assert_error(code, err, needle, prog="bench.py")
    assert out == ""
