"""Hostile and odd inputs to every command but prepare (tests/test_prepare_inputs.py
has those): bounded memory, no silent misreads, nothing overwritten, one line every
time. Each test builds its own input, small; each asserts the exit status, the single
line, and that earlier files are as they were."""
import hashlib
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fer
import ferplus
import runs
import runtime
from conftest import ENV, FAST, ROOT, assert_error


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the shared two-epoch run, free to be damaged."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    return out


# ---------------------------------------------------------------------------- Ctrl-C

@pytest.mark.parametrize("script, heavy", [("fer.py", "torch"), ("predict.py", "torch"), ("bench.py", "torch"),
                                           ("export.py", "torch"), ("prepare.py", "PIL")])
def test_ctrl_c_while_starting_is_one_line_and_exit_130(script, heavy, tmp_path):
    """Ctrl-C while the imports run: a stand-in for the heavy module interrupts its own
    process as it is imported, so the moment does not depend on timing."""
    stub = tmp_path / heavy
    stub.mkdir()
    (stub / "__init__.py").write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\n"
                                      "time.sleep(30)\n")
    env = {**ENV, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([sys.executable, str(ROOT / script), "--help"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == f"{script}: interrupted while starting; nothing was written"


def test_ctrl_c_in_a_run_is_one_line_and_exit_130(tiny_data, tmp_path, monkeypatch, call_main):
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(fer, "train_one_epoch", interrupt)
    code, _, err = call_main("fer.py", "train", "--data", tiny_data, *FAST, "--epochs", "1", "--out", tmp_path / "r")
    assert_error(code, err, "interrupted", status=130, prog="fer.py train")
    # stopped before its first epoch ended: no empty run folder is left behind
    assert not (tmp_path / "r").exists()


def test_a_run_folder_without_checkpoints_says_it_never_finished_an_epoch(tmp_path, call_main):
    (tmp_path / "runs" / "resnet34").mkdir(parents=True)  # a run killed before its first epoch ended
    code, _, err = call_main("fer.py", "validate", "--checkpoint", tmp_path / "runs" / "resnet34" / "best.pt")
    assert_error(code, err, "stopped before its first epoch ended", prog="fer.py validate")


# ---------------------------------------------------------------------------- nothing overwritten

def test_train_never_replaces_another_run(run_copy, tiny_data, call_main):
    before = {p.name: digest(p) for p in run_copy.glob("*.pt")}
    code, _, err = call_main("fer.py", "train", "--data", tiny_data, *FAST, "--epochs", "1", "--out", run_copy)
    assert_error(code, err, f"--out {run_copy} holds another run", "--resume", prog="fer.py train")
    assert {p.name: digest(p) for p in run_copy.glob("*.pt")} == before


def test_train_refuses_a_run_of_other_classes_too(run_copy, tiny_data, tmp_path, call_main):
    data = tmp_path / "two"
    for c in ("angry", "happy"):
        shutil.copytree(tiny_data / "train" / c, data / "train" / c)
    before = digest(run_copy / "last.pt")
    code, _, err = call_main("fer.py", "train", "--data", data, *FAST, "--epochs", "1", "--out", run_copy)
    assert_error(code, err, "holds another run", prog="fer.py train")
    assert digest(run_copy / "last.pt") == before


def test_a_dry_run_is_one_epoch_and_any_run_may_replace_it(tiny_data, tmp_path, call_main):
    out = tmp_path / "r"
    code, stdout, err = call_main("fer.py", "train", "--data", tiny_data, *FAST, "--epochs", "5", "--dry-run",
                                  "--no-amp", "--out", out)
    assert code == 0, err
    assert "epoch   1/1 (dry run)" in stdout  # one epoch of a one-epoch schedule, not 1 of 5
    last = runs.load_checkpoint(out / "last.pt")
    assert last["dry_run"] is True and last["args"]["epochs"] == 1
    code, stdout, err = call_main("fer.py", "train", "--data", tiny_data, *FAST, "--epochs", "1", "--no-amp",
                                  "--out", out)
    assert code == 0, err
    assert runs.load_checkpoint(out / "last.pt")["dry_run"] is False


@pytest.mark.parametrize("script", ["predict.py", "fer.py test"])
def test_a_bad_save_dir_leaves_an_earlier_json_as_it_was(script, tiny_run, tiny_data, tmp_path, call_main):
    out, _ = tiny_run
    (tmp_path / "taken").write_text("a file where a folder is asked for")
    (tmp_path / "p.json").write_text("earlier results")
    args = ["--checkpoint", out / "best.pt", "--json", tmp_path / "p.json", "--save-dir", tmp_path / "taken"]
    if script == "predict.py":
        code, _, err = call_main("predict.py", tiny_data / "test" / "happy", *args)
    else:
        code, _, err = call_main("fer.py", "test", "--data", tiny_data, *args)
    assert_error(code, err, "--save-dir", prog=script)
    assert (tmp_path / "p.json").read_text() == "earlier results"


# ---------------------------------------------------------------------------- checkpoints

def test_a_checkpoint_holding_pickled_code_is_refused_as_unsafe(tmp_path, call_main):
    class Payload:
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "ran"),)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"arch": "resnet34", "state_dict": Payload()}, f, protocol=2)
    code, _, err = call_main("predict.py", ROOT / "samples" / "happy_1.png", "--checkpoint", tmp_path / "evil.pt")
    assert_error(code, err, "refused as unsafe", "pickled Python code", prog="predict.py")
    assert "damaged" not in err and not (tmp_path / "ran").exists()


@pytest.mark.parametrize("field, value, needle", [("image_size", 100_000, "100000 px"),
                                                  ("image_size", "224", "'224' px"),
                                                  ("in_channels", 7, "7 input channels"),
                                                  ("classes", ["a"] * 5, "different class names"),
                                                  ("classes", [str(i) for i in range(5000)], "class names")])
def test_a_checkpoint_asking_for_what_no_network_can_use_is_refused_before_building(
        field, value, needle, run_copy, monkeypatch, call_main):
    ckpt = torch.load(run_copy / "best.pt", weights_only=True)
    torch.save({**ckpt, field: value}, run_copy / "odd.pt")

    def no_network(*a, **k):
        raise AssertionError("a network was built from the checkpoint's sizes")
    monkeypatch.setattr(fer, "build_model", no_network)
    code, _, err = call_main("predict.py", ROOT / "samples" / "happy_1.png", "--checkpoint", run_copy / "odd.pt")
    assert_error(code, err, needle, prog="predict.py")


@pytest.mark.parametrize("argv", [("fer.py", "train", "--image-size", "5000"),
                                  ("bench.py", "--image-size", "1025"), ("bench.py", "--report-size", "99999")])
def test_sizes_on_the_command_line_are_bounded(argv, call_main):
    code, _, err = call_main(*argv)
    assert code == 2 and "out of range" in err and "<= 1024" in err


# ---------------------------------------------------------------------------- pictures and votes

def save_gray(path, pixels):
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("dtype, top", [(np.uint16, 65535), (np.int32, 65535), (np.float32, 1.0)])
def test_wide_grayscale_is_scaled_by_its_range_not_clipped(dtype, top, tmp_path):
    """A 16-bit PNG (and 32-bit integer or float TIFF) of a gradient reads as the same
    gradient in 8 bits: 65535 -> 255; Pillow's convert() alone clips it to all white."""
    ramp = np.linspace(0, top, 48 * 48).reshape(48, 48).astype(dtype)
    path = save_gray(tmp_path / ("face.png" if dtype == np.uint16 else "face.tif"), ramp)
    got = np.asarray(fer.open_image(path, 1), dtype=np.float64)
    want = ramp.astype(np.float64) * 255 / top
    assert np.abs(got - want).max() <= 1.0
    assert got.min() == 0 and got.max() == 255


def test_a_lab_picture_reads_as_its_lightness_in_gray_and_colour(tmp_path):
    """Pillow opens a CIELAB TIFF but converts it to RGB only: grey faces go through RGB."""
    Image.new("LAB", (48, 48), (200, 128, 128)).save(tmp_path / "lab.tif")
    gray, colour = fer.open_image(tmp_path / "lab.tif", 1), fer.open_image(tmp_path / "lab.tif", 3)
    assert gray.mode == "L" and colour.mode == "RGB"
    assert abs(gray.getpixel((0, 0)) - 194) <= 2 and colour.getpixel((0, 0)) == (gray.getpixel((0, 0)),) * 3


def test_a_picture_that_cannot_be_decoded_stops_predict_or_is_skipped(tiny_data, tmp_path, call_main):
    folder = tmp_path / "faces"
    shutil.copytree(tiny_data / "test" / "happy", folder)
    (folder / "cut.png").write_bytes((folder / "000.jpg").read_bytes()[:40])  # a truncated download
    ckpt = ROOT / "checkpoints" / "googlenet_fer2013-5class_64.pt"
    code, _, err = call_main("predict.py", folder, "--checkpoint", ckpt)
    assert_error(code, err, "cut.png", "--skip-bad-images", prog="predict.py")
    code, out, err = call_main("predict.py", folder, "--skip-bad-images", "--checkpoint", ckpt)
    assert code == 0 and "skipped 1 unreadable image(s), first" in err and "cut.png" not in out


@pytest.mark.parametrize("bad", ["-1", "11", "3.5", "x", "²"])
def test_ferplus_votes_are_whole_numbers_from_0_to_10(bad):
    row = {**{f"ferplus_{k}": "0" for k in ferplus.FERPLUS_CLASSES}, "ferplus_happiness": bad, "file": "x.png"}
    with pytest.raises(fer.FerError, match=r"x\.png .*whole numbers from 0 to 10"):
        ferplus.majority(row)
    with pytest.raises(fer.FerError, match="at most 10"):
        ferplus.majority({**row, "ferplus_happiness": "6", "ferplus_neutral": "6"})


# ---------------------------------------------------------------------------- messages

def test_onecycle_refusal_says_how_to_fix_it(tiny_data, tmp_path, call_main):
    code, _, err = call_main("fer.py", "train", "--data", tiny_data, "--model", "resnet34", "--image-size", "32",
                             "--batch-size", "64", "--epochs", "1", "--out", tmp_path / "r")
    assert_error(code, err, "at least 3 steps", "; train more --epochs", prog="fer.py train")


def test_a_log_gets_a_progress_line_every_30_s_inside_a_long_epoch(monkeypatch):
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(runtime.time, "time", lambda: float(next(clock)))  # ten seconds a step
    import io
    log = io.StringIO()  # not a terminal
    p = runtime.Progress(steps=8, batch_size=4, stream=log)
    for step in range(1, 9):
        p.update(step, 1.0)
    p.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in log.getvalue()  # at 30 s and 60 s: plain lines
    assert lines[0].split()[:2] == ["step", "3/8"] and lines[0].endswith("s left in the epoch")
