"""Bad input, interruptions and untrusted files: the troubleshooting cases 1-9 and 11,
and case 12: every script's refusal as a user sees it.

Each case must end with a one-line error on stderr that names the problem and the
fix, a non-zero exit status, no Python traceback, and no damage to files already
written. Every case runs its script (`fer.py`, `predict.py`, `bench.py`,
`prepare.py` or `export.py`) in a subprocess at least once: the tests that take `cli` run both in
this process and as `python SCRIPT` in a subprocess, the subprocess half marked
slow (`python -m pytest -q -m slow`), because starting Python and torch costs
seconds per run on a small, shared CPU; the further variants of a case call the
script's `main` in this process only (`call_main`). An exception other than
SystemExit escaping `main` fails the test, as a traceback would. One trained run,
made in this process, is shared by the module (conftest's `tiny_run`).
"""
import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from PIL import Image

import fer
import predict
import runs
import runtime
from conftest import CLASSES, ENV, FAST, ROOT, SCRIPTS, assert_error, main_in_process, run_script, write_faces

EPOCHS = 2  # the shared run, conftest's `tiny_run`
# Case 7 interrupts a run of three epochs after epoch 1 and compares it with an
# uninterrupted one. Threads change the float sums: both use one thread.
EPOCHS_7 = 3
RUN_7 = (*FAST, "--epochs", str(EPOCHS_7), "--threads", "1")
# FAST in batches of 7: 3 steps an epoch (21 training images), the fewest onecycle takes,
# for the runs whose steps are not counted: a step of ResNet34 costs the same for 4 or 7 faces.
FEWER_STEPS = (*FAST[:-1], "7")
# (conftest's `dry_run`: the earlier checkpoints that a failing run in the same --out must
# leave intact; train refuses an --out that holds a real run: tests/test_hostile.py.)


# ----------------------------------------------------------------------------
# Helpers

def snapshot(folder):
    """Every file under `folder`: size, mtime and SHA-256, to show nothing changed."""
    return {p.relative_to(folder): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and not p.is_symlink()}


def link_run(run, dest):
    """A previous run's checkpoints in `dest`, as hard links (the files are large):
    fer.py replaces a checkpoint by renaming, so the shared run is never touched."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("best.pt", "last.pt"):
        os.link(run / name, dest / name)
    return dest


def faces_with(root, classes=CLASSES, per_class=3, split="train", seed=0):
    """`root/split/<class>/NNN.jpg`, small."""
    write_faces(root / split, classes=classes, per_class=per_class, size=40, seed=seed)
    return root


@pytest.fixture(scope="module")
def run(tiny_run):
    """One run, shared: its checkpoints feed the checkpoint cases."""
    out = tiny_run[0]
    assert fer.load_checkpoint(out / "last.pt")["epoch"] == EPOCHS
    return out


@pytest.fixture(scope="module")
def ckpt(run):
    """The shared run's last.pt, loaded (to craft damaged variants from)."""
    return fer.load_checkpoint(run / "last.pt")


# ----------------------------------------------------------------------------
# 1. --data missing, not a folder, or without train/ (test/ for `test`)

def test_1_data_missing(tmp_path, cli):
    code, _, err = cli("fer.py", "train", "--data", tmp_path / "nowhere", "--out", tmp_path / "out", *FAST, "--epochs", "1")
    assert_error(code, err, tmp_path / "nowhere" / "train", "not found", "--data DIR must hold")
    assert not (tmp_path / "out").exists()  # stopped before any work


def test_1_data_without_test(run, tmp_path, cli):
    data = faces_with(tmp_path / "data")  # train/ only
    before = snapshot(run)
    code, _, err = cli("fer.py", "test", "--checkpoint", run / "best.pt", "--data", data)
    assert_error(code, err, data / "test", "not found", "DIR/test/<class>/")
    assert snapshot(run) == before


@pytest.mark.parametrize("case", ["file", "no_train", "no_data_option", "test_no_data_option",
                                  "validate_no_train", "test_missing"])
def test_1_data_layouts(case, run, tmp_path, call_main, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/fer5 here: the default --data is missing
    out = tmp_path / "out"
    only_test = faces_with(tmp_path / "only_test", split="test")
    a_file = tmp_path / "faces.zip"
    a_file.write_bytes(b"PK\x03\x04 not really")
    calls = {
        "file": (("train", "--data", a_file, "--out", out, *FAST), (a_file / "train", "not found")),
        "no_train": (("train", "--data", only_test, "--out", out, *FAST), (only_test / "train", "not found")),
        "no_data_option": (("train", "--out", out, *FAST),
                           ("data/fer5/train not found", "`python prepare.py FER2013-DOWNLOAD` writes data/fer5")),
        "test_no_data_option": (("test", "--checkpoint", run / "last.pt"),
                                ("data/fer5/test not found", "`python prepare.py FER2013-DOWNLOAD` writes data/fer5")),
        "validate_no_train": (("validate", "--checkpoint", run / "last.pt", "--data", only_test),
                              (only_test / "train", "not found", "DIR/train/<class>/")),
        "test_missing": (("test", "--checkpoint", run / "last.pt", "--data", tmp_path / "nowhere"),
                         (tmp_path / "nowhere" / "test", "not found")),
    }
    args, needles = calls[case]
    before = snapshot(tmp_path)
    assert_error(*call_main("fer.py", *args)[::2], *needles)
    assert snapshot(tmp_path) == before and not out.exists()


# ----------------------------------------------------------------------------
# 2. Empty class folders, one class, odd extensions, non-image files

def test_2_one_class(tmp_path, cli):
    data = faces_with(tmp_path / "data", classes=("happy",))
    code, _, err = cli("fer.py", "train", "--data", data, "--out", tmp_path / "out", *FAST)
    assert_error(code, err, data / "train", "1 class folder(s)", "at least two")
    assert not list((tmp_path / "out").glob("*.pt"))


@pytest.mark.parametrize("case", ["empty_class", "only_text_files", "no_class_folders"])
def test_2_classes_without_images(case, tmp_path, call_main):
    data = faces_with(tmp_path / "data")
    train = data / "train"
    if case == "empty_class":
        (train / "surprise").mkdir()
        needles = (train / "surprise", "has no images", "add some or remove the folder")
    elif case == "only_text_files":
        (train / "surprise").mkdir()
        (train / "surprise" / "README.txt").write_text("faces go here\n")
        needles = (train / "surprise", "has no images")
    else:
        for p in train.rglob("*.jpg"):
            p.rename(train / f"{p.parent.name}_{p.name}")
        for c in CLASSES:
            (train / c).rmdir()
        needles = (train, "0 class folder(s)")
    before = snapshot(data)
    assert_error(*call_main("fer.py", "train", "--data", data, "--out", tmp_path / "out", *FAST)[::2], *needles)
    assert snapshot(data) == before


def test_2_odd_extensions_load_and_other_files_are_ignored(tmp_path, cli):
    """.JPG, .jpeg, .PNG, .bmp, .WebP ... all load; README.txt and the like are
    skipped, and counted."""
    data = faces_with(tmp_path / "data", per_class=6)
    exts = (".JPG", ".jpeg", ".PNG", ".bmp", ".WebP", ".Png")
    for c in CLASSES:
        for p, ext in zip(sorted((data / "train" / c).glob("*.jpg")), exts):
            with Image.open(p) as img:
                img.save(p.with_suffix(ext))
            p.unlink()
    (data / "train" / "angry" / "README.txt").write_text("where these faces come from\n")
    (data / "train" / "happy" / "notes.md").write_text("# notes\n")
    (data / "train" / "sad" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    code, out, err = cli("fer.py", "train", "--data", data, "--out", tmp_path / "out", *FAST, "--epochs", "1")
    assert code == 0, err
    assert "Traceback" not in err
    assert f"ignored 3 hidden or non-image file(s) under {data / 'train'}" in out
    assert "15 training and 3 validation images of 3 classes" in out  # 6 a class, all read
    assert fer.load_checkpoint(tmp_path / "out" / "last.pt")["classes"] == list(CLASSES)


# ----------------------------------------------------------------------------
# 3. Corrupt or truncated images

def test_3_corrupt_image(tmp_path, cli):
    data = faces_with(tmp_path / "data")
    bad = data / "train" / "happy" / "001.jpg"
    bad.write_bytes(b"this is not a JPEG")
    before = snapshot(data)
    code, _, err = cli("fer.py", "train", "--data", data, "--out", tmp_path / "out", *FAST)
    assert_error(code, err, f"cannot read image {bad}", "--skip-bad-images")
    assert snapshot(data) == before and not list((tmp_path / "out").glob("*.pt"))


def test_3_truncated_image_names_it_and_skip_goes_on(run, tmp_path, call_main):
    data = faces_with(tmp_path / "data", split="test", per_class=2, seed=1)
    bad = data / "test" / "sad" / "001.jpg"
    bad.write_bytes(bad.read_bytes()[:len(bad.read_bytes()) // 2])
    assert_error(*call_main("fer.py", "test", "--checkpoint", run / "best.pt", "--data", data)[::2],
                 f"cannot read image {bad}", "truncated", "--skip-bad-images")
    code, out, err = call_main("fer.py", "test", "--checkpoint", run / "best.pt", "--data", data, "--skip-bad-images")
    assert code == 0, err
    assert f"skipped 1 unreadable image(s), first {bad}" in out
    assert f"on {data / 'test'}: 5 images" in out  # 6 files, the truncated one left out


# ----------------------------------------------------------------------------
# 4. Missing, foreign, truncated checkpoints; another network; other classes

def test_4_truncated_checkpoint(run, tiny_data, tmp_path, cli):
    cut = tmp_path / "cut.pt"
    cut.write_bytes((run / "best.pt").read_bytes()[:100_000])
    before = snapshot(tmp_path)
    code, _, err = cli("fer.py", "test", "--checkpoint", cut, "--data", tiny_data)
    assert_error(code, err, cut, "not a readable checkpoint", "truncated")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["missing", "text", "empty", "random_bytes", "tensor", "no_classes", "weights_of_another_network"])
def test_4_not_a_checkpoint(case, ckpt, tiny_data, tmp_path, call_main):
    path = tmp_path / f"{case}.pt"
    needles = ("not a readable checkpoint",)
    if case == "missing":
        needles = ("does not exist",)
    elif case == "text":
        path.write_text("resnet34 weights, see the README\n")
    elif case == "empty":
        path.write_bytes(b"")
        needles = ("not a readable checkpoint", "empty file")
    elif case == "random_bytes":
        path.write_bytes(bytes(range(256)) * 64)
    elif case == "tensor":
        torch.save(torch.zeros(3), path)
        needles = ("is not a fer checkpoint", "arch, classes")
    elif case == "no_classes":
        torch.save({k: v for k, v in ckpt.items() if k not in ("classes", "optimizer")}, path)
        needles = ("is not a fer checkpoint", "lacks classes")
    else:  # labelled googlenet, holding resnet34 weights
        torch.save({**{k: v for k, v in ckpt.items() if k != "optimizer"}, "arch": "googlenet"}, path)
        needles = ("do not fit a googlenet network",)
    before = snapshot(tmp_path)
    assert_error(*call_main("fer.py", "test", "--checkpoint", path, "--data", tiny_data)[::2], path, *needles)
    assert snapshot(tmp_path) == before


def test_4_resume_with_another_network(run, tmp_path, call_main):
    before = snapshot(run)
    assert_error(*call_main("fer.py", "train", "--resume", run / "last.pt", "--model", "googlenet")[::2],
                 "is a resnet34 checkpoint but --model is googlenet", "drop --model")
    assert snapshot(run) == before


def test_4_resume_from_an_export(run, tmp_path, call_main):
    exported = tmp_path / "export.pt"
    assert call_main("export.py", "--checkpoint", run / "best.pt", "--out", exported)[0] == 0
    before = snapshot(tmp_path)
    assert_error(*call_main("fer.py", "train", "--resume", exported)[::2], "no training state", "optimizer", "last.pt")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["test", "validate"])
def test_4_other_classes(command, run, tmp_path, call_main):
    split = "test" if command == "test" else "train"
    data = faces_with(tmp_path / "data", classes=("angry", "happy", "surprise"), split=split, per_class=2)
    before = snapshot(run)
    assert_error(*call_main("fer.py", command, "--checkpoint", run / "best.pt", "--data", data)[::2],
                 "trained on classes ['angry', 'happy', 'sad']", "has ['angry', 'happy', 'surprise']")
    assert snapshot(run) == before


# ----------------------------------------------------------------------------
# 5. A checkpoint that carries pickled code

class Payload:
    """Unpickling this calls Path(marker).touch(): code run by merely loading a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def test_5_pickled_code_is_refused_and_never_runs(ckpt, tiny_data, tmp_path, cli):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({**{k: v for k, v in ckpt.items() if k != "optimizer"}, "note": Payload(marker)}, evil)
    before = snapshot(tmp_path)
    code, _, err = cli("fer.py", "test", "--checkpoint", evil, "--data", tiny_data)
    assert_error(code, err, evil, "refused as unsafe", "pickled Python code", "none of it ran")
    assert not marker.exists()
    assert snapshot(tmp_path) == before
    # The file is really armed: an unsafe load runs the code.
    torch.load(evil, weights_only=False)
    assert marker.exists()


# ----------------------------------------------------------------------------
# 6. Options out of range, caught before any work starts

def test_6_image_size_below_minimum(tiny_data, tmp_path, cli):
    code, _, err = cli("fer.py", "train", "--data", tiny_data, "--out", tmp_path / "out", "--model", "alexnet",
                           "--image-size", "32", "--epochs", "1")
    assert_error(code, err, "--image-size 32 is below alexnet's minimum of 63", "--image-size 63")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, needle", [
    (("--epochs", "0"), "--epochs: 0 is out of range (must be >= 1)"),
    (("--epochs", "two"), "--epochs: 'two' is not an integer"),
    (("--lr", "-1"), "--lr: -1 is out of range (must be > 0 and <= 3.40282e+38)"),
    (("--lr", "1e39"), "--lr: 1e39 is out of range"),
    (("--lr", "0"), "--lr: 0 is out of range"),
    (("--lr", "nan"), "--lr: nan is out of range"),
    (("--batch-size", "0"), "--batch-size: 0 is out of range (must be >= 1)"),
    (("--val-fraction", "1.5"), "--val-fraction: 1.5 is out of range (must be > 0 and < 1)"),
    (("--val-fraction", "0"), "--val-fraction: 0 is out of range"),
    (("--image-size", "0"), "--image-size: 0 is out of range"),
    (("--mixup", "0.001"), "--mixup: 0.001 is too small: use at least 0.01, or 0 for no mixup"),
    (("--mixup", "1000"), "--mixup: 1000 is out of range (must be >= 0 and <= 100)"),
    (("--model", "googlenet", "--image-size", "16"), "--image-size 16 is below googlenet's minimum of 31"),
    (("--model", "vgg11", "--image-size", "31"), "--image-size 31 is below vgg11's minimum of 32"),
    (("--model", "resnet18"), "--model: invalid choice: 'resnet18'"),
    (("--ema", "1"), "--ema: 1 is out of range (must be > 0 and < 1)"),
    (("--ema", "0"), "--ema: 0 is out of range (must be > 0 and < 1)"),
])
def test_6_options_out_of_range(options, needle, tiny_data, tmp_path, call_main):
    args = dict(zip(FAST[::2], FAST[1::2]))
    args.update(zip(options[::2], options[1::2]))
    code, _, err = call_main("fer.py", "train", "--data", tiny_data, "--out", tmp_path / "out", *sum(args.items(), ()))
    assert_error(code, err, needle)
    assert not (tmp_path / "out").exists()  # stopped before any work: not even --out was made


# (script, what comes before its options): validate and test are fer.py's, predict is a script
EVALUATIONS = {"test": ("fer.py", ("test",)), "validate": ("fer.py", ("validate",)),
               "predict": ("predict.py", ())}


@pytest.mark.parametrize("command", sorted(EVALUATIONS))
def test_6_evaluation_options_out_of_range(command, run, tiny_data, call_main):
    script, lead = EVALUATIONS[command]
    paths = (tiny_data / "test",) if command == "predict" else ()
    code, _, err = call_main(script, *lead, *paths, "--checkpoint", run / "best.pt", "--batch-size", "0")
    assert_error(code, err, "--batch-size: 0 is out of range", prog=script)


@pytest.mark.parametrize("command", sorted(EVALUATIONS))
def test_6_workers_belongs_to_train_and_bench_only(command, run, tiny_data, call_main):
    """--workers feeds the report's PIL pipeline, which only `train` and bench.py run:
    validate, test and predict refuse it as an option they do not have."""
    script, lead = EVALUATIONS[command]
    paths = (tiny_data / "test",) if command == "predict" else ()
    code, _, err = call_main(script, *lead, *paths, "--checkpoint", run / "best.pt", "--workers", "0")
    assert_error(code, err, "unrecognized arguments: --workers 0", prog=script)


# ----------------------------------------------------------------------------
# 7. Ctrl-C during training; --resume ends with the weights of an uninterrupted run

def test_7_interrupt_keeps_the_checkpoints_and_says_how_to_resume(tiny_data, tmp_path, monkeypatch, call_main):
    """The quick half of case 7, in this process: Ctrl-C (KeyboardInterrupt) in the
    second epoch ends with status 130, one line naming last.pt and the --resume
    command, and the first epoch's checkpoints intact. The real SIGINT, and the
    resume to the uninterrupted run's weights, are the slow test below."""
    out = tmp_path / "out"
    real, epochs = fer.train_one_epoch, []

    def interrupted(*args, **kwargs):
        epochs.append(len(epochs) + 1)
        if len(epochs) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fer, "train_one_epoch", interrupted)
    code, _, err = call_main("fer.py", "train", "--data", tiny_data, "--out", out, *FEWER_STEPS, "--epochs", "2",
                             "--threads", "1")
    assert_error(code, err, f"interrupted; {out}/last.pt holds the last completed epoch",
                 f"--resume {out}/last.pt", status=130)
    assert epochs == [1, 2] and not list(out.glob(".*.tmp"))
    assert fer.load_checkpoint(out / "last.pt")["epoch"] == 1
    assert fer.load_checkpoint(out / "best.pt")["epoch"] == 1


@pytest.mark.slow  # a real SIGINT needs a process of its own; three runs
def test_7_ctrl_c_keeps_checkpoints_and_resume_matches(tiny_data, tmp_path):
    uninterrupted = tmp_path / "full"  # the run that the interrupted and resumed one must reach
    code, _, err = main_in_process("fer.py", "train", "--data", tiny_data, "--out", uninterrupted, *RUN_7)
    assert code == 0 and fer.load_checkpoint(uninterrupted / "last.pt")["epoch"] == EPOCHS_7, err
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "fer.py"), "train", "--data", str(tiny_data),
                             "--out", str(out), *RUN_7], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # Python only turns SIGINT into KeyboardInterrupt if it is not ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:  # the epoch line is printed just before the checkpoints are written
            if re.match(r"epoch +1/", line):
                break
        assert proc.poll() is None, proc.stderr.read()
        deadline = time.time() + 60  # epoch 1 always improves: last.pt, then best.pt
        while not (out / "best.pt").exists() and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)  # during epoch 2, or while it saves
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert f"interrupted; {out}/last.pt holds the last completed epoch" in err
    assert f"--resume {out}/last.pt" in err
    assert not list(out.glob(".*.tmp"))  # no half-written file left behind
    cut = fer.load_checkpoint(out / "last.pt")
    assert 1 <= cut["epoch"] < EPOCHS_7
    fer.load_checkpoint(out / "best.pt")

    r = run_script("fer.py", "train", "--resume", out / "last.pt", "--threads", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {out / 'last.pt'} after epoch {cut['epoch']} of {EPOCHS_7}" in r.stdout
    full = fer.load_checkpoint(uninterrupted / "last.pt")["state_dict"]
    resumed = fer.load_checkpoint(out / "last.pt")
    assert resumed["epoch"] == EPOCHS_7 and resumed["state_dict"].keys() == full.keys()
    for k, v in full.items():
        assert torch.equal(resumed["state_dict"][k], v), k


# ----------------------------------------------------------------------------
# 8. A loss that becomes NaN or infinite

def test_8_diverging_loss_stops_and_keeps_the_last_good_checkpoint(dry_run, tiny_data, tmp_path, cli):
    out = link_run(dry_run, tmp_path / "out")  # a dry run's checkpoints in the same --out, which it may replace
    before = snapshot(out)
    code, _, err = cli("fer.py", "train", "--data", tiny_data, "--out", out, *FAST, "--epochs", "2", "--lr", "1e30")
    assert_error(code, err, "at epoch 1 step ", "training diverged", "lower --lr", "peak is 1e+30; try 1e+29")
    assert re.search(r"the loss became (nan|inf|-inf) at epoch 1 step \d+/5", err), err
    assert snapshot(out) == before
    assert fer.load_checkpoint(out / "last.pt")["epoch"] == 1


def test_8_non_finite_weights_are_never_saved():
    """A finite loss at the last step can still leave inf weights: caught before saving."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e38)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    batches = [(torch.randn(8, 4) * 1e10, torch.randint(0, 2, (8,)))]  # finite loss, gradients ~1e10
    with pytest.raises(fer.FerError, match=r"weights became inf or NaN at epoch 3 step 1/1: .*lower --lr"):
        fer.train_one_epoch(model, batches, 1, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                            nn.CrossEntropyLoss(), runtime.Runtime(torch.device("cpu")), 3)


# ----------------------------------------------------------------------------
# 9. Output folder not writable; disk full while saving

def test_9_out_not_a_folder(tiny_data, tmp_path, cli):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the output folder should go\n")
    before = snapshot(tmp_path)
    code, _, err = cli("fer.py", "train", "--data", tiny_data, "--out", blocker / "resnet34", *FAST)
    assert_error(code, err, f"cannot create --out folder {blocker / 'resnet34'}", "Not a directory",
                 "choose another --out")
    assert snapshot(tmp_path) == before


@pytest.mark.slow  # a training epoch; the quick half of case 9 is test_9_disk_full_in_save_checkpoint
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_9_disk_full_keeps_the_previous_checkpoint(dry_run, tiny_data, tmp_path, cli):
    """A real ENOSPC while training saves: the temporary file that fer.py writes
    before renaming it over last.pt is a link to /dev/full."""
    out = link_run(dry_run, tmp_path / "out")  # a dry run's checkpoints, which a new run may replace
    before = snapshot(out)
    (out / ".last.pt.tmp").symlink_to("/dev/full")
    code, stdout, err = cli("fer.py", "train", "--data", tiny_data, "--out", out, *FEWER_STEPS, "--epochs", "1",
                            "--threads", "1")
    assert_error(code, err, f"cannot write checkpoint {out / 'last.pt'}", "No space left on device",
                 "free disk space")
    assert "epoch   1/1" in stdout  # it failed while saving, not before
    assert not (out / ".last.pt.tmp").is_symlink()  # the temporary file is cleaned up
    assert snapshot(out) == before  # last.pt and best.pt untouched
    assert fer.load_checkpoint(out / "last.pt")["dry_run"]  # still the dry run's


def test_9_disk_full_in_save_checkpoint(ckpt, tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    torch.save({k: v for k, v in ckpt.items() if k != "optimizer"}, path)
    before = snapshot(tmp_path)

    def full_disk(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs.torch, "save", full_disk)
    with pytest.raises(fer.FerError, match=f"cannot write checkpoint {re.escape(str(path))} "
                                           r"\(No space left on device\); free disk space or choose another --out"):
        runs.save_checkpoint(ckpt, path)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before  # no temporary file left either
    assert fer.load_checkpoint(path)["epoch"] == EPOCHS


@pytest.mark.parametrize("case", ["export_out", "train_out", "save_dir", "json"])
def test_9_outputs_below_a_regular_file(case, run, tiny_data, tmp_path, call_main):
    blocker = tmp_path / "results"
    blocker.write_text("a file\n")
    before = snapshot(tmp_path)
    prog = "fer.py"
    if case == "export_out":
        result, prog = call_main("export.py", "--checkpoint", run / "best.pt", "--out", blocker / "model.pt"), "export.py"
        needles = (f"cannot create --out {blocker / 'model.pt'}: {blocker} is a file", "choose another --out")
    elif case == "train_out":
        result = call_main("fer.py", "train", "--data", tiny_data, "--out", blocker, *FAST)
        needles = (f"cannot create --out folder {blocker} (a file has that name)", "choose another --out")
    elif case == "save_dir":
        result = call_main("fer.py", "test", "--checkpoint", run / "best.pt", "--data", tiny_data, "--save-dir", blocker / "x")
        needles = (f"cannot create --save-dir {blocker / 'x'}: {blocker} is a file", "choose another --save-dir")
    else:
        result = call_main("fer.py", "test", "--checkpoint", run / "best.pt", "--data", tiny_data, "--json", blocker / "m.json")
        needles = (f"cannot create --json {blocker / 'm.json'}: {blocker} is a file", "choose another --json")
    assert_error(*result[::2], *needles, prog=prog)
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders anyway")
def test_9_read_only_out_folder(tiny_data, tmp_path, call_main):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert_error(*call_main("fer.py", "train", "--data", tiny_data, "--out", out, *FAST)[::2],
                     f"--out folder {out} is not writable", "choose another --out")
    finally:
        out.chmod(0o700)


# ----------------------------------------------------------------------------
# 11. predict: --detect without OpenCV, a photo without a face

DETECT_NEEDLES = ("--detect needs the face cascades of OpenCV 4, which are not installed",
                  'pip install "opencv-python-headless<5"', "leave out --detect")


def test_11_detect_without_opencv_says_what_to_install(monkeypatch, call_main):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` fails, whether or not OpenCV is installed
    code, out, err = call_main("predict.py", "--detect", ROOT / "samples" / "happy_1.png")
    assert_error(code, err, *DETECT_NEEDLES, prog="predict.py")
    assert out == ""  # before the model loads


@pytest.mark.slow
def test_11_detect_without_opencv_in_a_subprocess(tmp_path):
    (tmp_path / "cv2.py").write_text("raise ImportError('no OpenCV here')\n")  # shadows an installed one
    r = run_script("predict.py", "--detect", ROOT / "samples" / "happy_1.png", env={**ENV, "PYTHONPATH": str(tmp_path)})
    assert_error(r.returncode, r.stderr, *DETECT_NEEDLES, prog="predict.py")


def test_11_a_photo_without_a_face_is_not_classified(run, tmp_path, cli):
    pytest.importorskip("cv2")
    Image.new("RGB", (640, 360), (90, 120, 150)).save(tmp_path / "empty.png")
    code, out, err = cli("predict.py", tmp_path / "empty.png", "--checkpoint", run / "best.pt", "--threads", "1")
    assert_error(code, err, f"no face found in {tmp_path / 'empty.png'}", "give photos of frontal faces",
                 "--no-detect to classify whole pictures", prog="predict.py")
    assert out == ""


# ----------------------------------------------------------------------------
# 12. Every script, as a user runs it: a refusal is one line, `PROG: error: WHAT; HOW`,
# exit status 2, no traceback; and no module of the repository is imported twice

# What a refusal prints: the program, what is wrong, and (after "; ") how to fix it.
REFUSAL = re.compile(r"(?P<prog>fer\.py [a-z]+|[a-z]+\.py): error: "
                     r"(?P<what>[^;\n]+); (?P<how>[^\n]+)\n")

# sitecustomize runs before the script: at exit (sys.exit(2) included), it writes which
# module each file of the repository was loaded as. A script run as __main__ that one of
# its imports imported again by name would be there twice (`predict.py` as __main__ and
# as predict), with two FerError classes: guard's `except FerError` would miss the
# other one's errors, and the user would see a traceback.
MODULES_AT_EXIT = """import atexit, json, os, sys
from pathlib import Path

def dump():
    # Each module object once, with every name it has in sys.modules (multiprocessing
    # names __main__ __mp_main__ too: one module, two names, not a second import).
    # __main__ loses __file__ once its script returns: its loader still knows the path.
    root, modules = Path(os.environ["FER_REPO"]).resolve(), {}
    for name, m in list(sys.modules.items()):
        file = getattr(m, "__file__", None) or getattr(getattr(m, "__loader__", None), "path", None)
        if isinstance(file, str) and Path(file).resolve().parent == root:
            modules.setdefault(id(m), [[], str(Path(file).resolve())])[0].append(name)
    Path(os.environ["FER_MODULES"]).write_text(json.dumps(dict(modules=list(modules.values()),
                                                               torch="torch" in sys.modules)))

atexit.register(dump)
"""


def script_refusals(tmp_path):
    """{case: (script, args, prog, what, how)}: a missing folder or file for each
    script, and for predict.py also a refusal raised in fer.py (a file that is no
    checkpoint), which predict.py's guard must catch as its own."""
    text = tmp_path / "notes.pt"
    text.write_text("resnet34 weights, see the README\n")
    face = ROOT / "samples" / "happy_1.png"
    return {
        "fer.py": ("fer.py", ("train", "--data", tmp_path / "nowhere", *FAST, "--out", tmp_path / "out"), "fer.py train",
                   f"{tmp_path / 'nowhere' / 'train'} not found", "--data DIR must hold DIR/train/<class>/"),
        "predict.py": ("predict.py", (tmp_path / "missing.jpg",), "predict.py",
                       f"{tmp_path / 'missing.jpg'} does not exist", "give image files or folders of images"),
        "predict.py, from fer.py": ("predict.py", (face, "--checkpoint", text), "predict.py",
                                    f"{text} is not a readable checkpoint", "use the .pt file written by"),
        "bench.py": ("bench.py", ("--data", tmp_path / "nowhere", *FAST, "--steps", "1"), "bench.py",
                     f"{tmp_path / 'nowhere' / 'train'} is not a folder", "--data DIR needs DIR/train/<class>/"),
        "prepare.py": ("prepare.py", (tmp_path / "nowhere.csv", "--out", tmp_path / "data"), "prepare.py",
                       f"{tmp_path / 'nowhere.csv'} does not exist", "give the downloaded fer2013.csv"),
        "export.py": ("export.py", ("--checkpoint", tmp_path / "nowhere" / "best.pt", "--out", tmp_path / "out.pt"),
                      "export.py", f"checkpoint {tmp_path / 'nowhere' / 'best.pt'} does not exist",
                      "give the .pt file written by `fer.py train`"),
        "optimism.py": ("optimism.py", (tmp_path / "nowhere",), "optimism.py",
                        f"cannot read {tmp_path / 'nowhere' / 'history.csv'}",
                        "give the --out folder of a `fer.py train` run"),
    }


CASES_12 = ["fer.py", "predict.py", "predict.py, from fer.py", "bench.py", "prepare.py", "export.py", "optimism.py"]


def test_12_every_script_has_its_refusal_case(tmp_path):
    """Each script that common.SCRIPTS lists is run by the subprocess test below."""
    assert {script for script, *_ in script_refusals(tmp_path).values()} == set(SCRIPTS)


@pytest.mark.slow  # a Python (and, but for prepare.py, torch) of its own per script
@pytest.mark.parametrize("case", CASES_12)
def test_12_a_script_refuses_in_one_line_and_imports_each_module_once(case, tmp_path):
    script, args, prog, what, how = script_refusals(tmp_path)[case]
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(MODULES_AT_EXIT)
    env = {**ENV, "PYTHONPATH": str(tmp_path / "site"), "FER_REPO": str(ROOT),
           "FER_MODULES": str(tmp_path / "modules.json")}
    r = run_script(script, *args, cwd=tmp_path, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    m = REFUSAL.fullmatch(r.stderr)
    assert m and m["prog"] == prog, r.stderr
    assert what in m["what"] and how in m["how"], r.stderr
    assert not any((tmp_path / name).exists() for name in ("out", "data", "out.pt"))
    at_exit = json.loads((tmp_path / "modules.json").read_text())
    files = [f for _, f in at_exit["modules"]]
    assert len(files) == len(set(files)), at_exit  # each file of the repository loaded once
    names = {name: f for aliases, f in at_exit["modules"] for name in aliases}
    assert names["__main__"] == str(ROOT / script) and "common" in names, at_exit
    if script == "prepare.py":  # it needs no torch: neither torch nor a module that imports it is loaded
        assert not at_exit["torch"] and not {"fer", "runtime", "pictures", "nets"} & names.keys(), at_exit


@pytest.mark.slow  # a Python of its own (no torch: a fraction of a second)
def test_12_the_check_sees_a_script_imported_twice(tmp_path):
    """The control of the test above: a script that imports itself by name is loaded
    twice, as __main__ and as itself, and the sitecustomize dump shows its file twice."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(MODULES_AT_EXIT)
    (tmp_path / "twice.py").write_text("import twice\n")
    env = {**ENV, "PYTHONPATH": str(tmp_path / "site"), "FER_REPO": str(tmp_path),
           "FER_MODULES": str(tmp_path / "modules.json")}
    r = subprocess.run([sys.executable, str(tmp_path / "twice.py")], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    files = [f for _, f in json.loads((tmp_path / "modules.json").read_text())["modules"]]
    assert files == [str(tmp_path / "twice.py")] * 2


def test_12_one_ferror_class_for_every_module():
    """The scripts and fer.py raise and catch the same FerError, common's."""
    import bench, common, export, ferplus, prepare  # noqa: E401
    assert fer.FerError is common.FerError is predict.FerError is prepare.FerError is runtime.FerError
    assert ferplus.FerError is runs.FerError is export.common.FerError is common.FerError
    assert bench.fer is fer and predict.fer is fer
    assert all(module.FerError is common.FerError for module in SCRIPTS.values() if hasattr(module, "FerError"))
