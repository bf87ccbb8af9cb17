"""runtime.py: where and how fer.py computes (the device, bfloat16 only on CPUs with
native instructions for it, as bench.py reports), and what a run shows while it
works (the progress line)."""
import argparse
import io

import pytest
import torch

import bench
import fer
import runtime


@pytest.fixture
def cpu_flags(monkeypatch):
    """cpu_flags(FLAGS): the CPU reads as having FLAGS (None: no /proc/cpuinfo), for
    setup_runtime's choice (runtime) and for what bench.py reports (which imported
    the function by name)."""
    def pretend(flags):
        for module in (runtime, bench):
            monkeypatch.setattr(module, "cpu_flags", lambda: flags)
    return pretend


@pytest.mark.parametrize("flags, chosen", [({"avx2", "fma"}, "float32 (no native bfloat16 instructions"),
                                           ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16 autocast (native"),
                                           ({"avx2", "amx_bf16"}, "bfloat16 autocast (native")])
def test_cpu_precision_follows_its_flags(flags, chosen, cpu_flags):
    """bfloat16 only where the CPU has native instructions for it; bench says which
    features it found and what it chose."""
    cpu_flags(flags)
    args = argparse.Namespace(device="cpu", threads=torch.get_num_threads(), amp=None, channels_last=None)
    rt = runtime.setup_runtime(args)
    assert (rt.amp_dtype == torch.bfloat16) == bool({"avx512_bf16", "amx_bf16"} & flags)
    text = bench.describe_precision(rt, args)
    assert text.startswith(chosen) and "AVX2 yes" in text
    assert ("AVX512-BF16 yes" in text) == ("avx512_bf16" in flags) and ("AMX-BF16 yes" in text) == ("amx_bf16" in flags)


def test_cpu_precision_says_why(cpu_flags):
    """--amp on a CPU without bfloat16 instructions still trains in float32, for that
    reason; where no flags can be read (ARM, other systems), bench says so."""
    cpu_flags({"avx2"})
    args = argparse.Namespace(device="cpu", threads=torch.get_num_threads(), amp=True, channels_last=None)
    assert bench.describe_precision(runtime.setup_runtime(args), args).startswith("float32 (no native bfloat16")
    cpu_flags(None)
    args.amp = False
    text = bench.describe_precision(runtime.setup_runtime(args), args)
    assert text.startswith("float32 (--no-amp)") and "CPU flags unknown" in text


def test_fer_runs_on_the_runtime_of_runtime_py():
    """fer.py computes with runtime.py's device set-up and prints with its log, so a
    test that patches fer.setup_runtime patches what fer.py calls."""
    assert fer.setup_runtime is runtime.setup_runtime and fer.log is runtime.log and fer.Progress is runtime.Progress


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible here")
def test_a_missing_gpu_is_refused_in_one_line():
    with pytest.raises(fer.FerError, match="--device cuda: no CUDA GPU is visible; use --device cpu or auto"):
        runtime.pick_device("cuda")
    assert runtime.pick_device("cpu") == "cpu"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_is_rewritten_in_place_on_a_terminal_only(monkeypatch):
    clock = iter(range(100))
    monkeypatch.setattr(runtime.time, "time", lambda: float(next(clock)))  # one second a step
    term = Terminal()
    p = runtime.Progress(steps=4, batch_size=8, stream=term)
    for step in range(1, 5):
        p.update(step, 2.0 / step)
    p.close()
    text = term.getvalue()
    lines = text.split("\r")[1:]
    assert len(lines) == 6 and lines[4].isspace() and lines[5] == ""  # four updates, then the line blanked
    assert lines[0].strip() == "step 1/4       8 img/s  loss 2.0000     3 s left in the epoch"
    assert lines[3].split()[:2] == ["step", "4/4"] and lines[3].rstrip().endswith("0 s left in the epoch")
    assert "\n" not in text and len({len(line) for line in lines[:4]}) == 1  # padded: no leftovers
    pipe = io.StringIO()  # a log file or CI: nothing at all
    p = runtime.Progress(steps=4, batch_size=8, stream=pipe)
    p.update(4, 1.0)
    p.close()
    assert pipe.getvalue() == ""
