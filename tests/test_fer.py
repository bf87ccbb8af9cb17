"""End to end: fer.py train / validate / test on a tiny ImageFolder, the in-memory
data pipeline, test-time augmentation, the shipped checkpoints, and torchrun.

The commands run in this process (`main_in_process`, `call_main`): starting Python
and torch costs seconds per run on a small, shared CPU. What needs processes of its
own (torchrun, a resume in a fresh process) or takes long is marked slow."""
import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.datasets import ImageFolder

import fer
import nets
import runtime
from conftest import FAST, ROOT, SCRIPTS, assert_error, main_in_process, run_script, train_cut


def state_dicts_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained(tiny_run):
    """One 2-epoch run (conftest's, shared with test_errors), for the tests that only
    read its checkpoint: (its folder, its stdout)."""
    return tiny_run


def test_train_writes_best_and_last(trained):
    out, stdout = trained
    assert len(re.findall(r"^epoch +\d+/2 +loss [\d.]+ +val acc [\d.]+ +val macro-F1 [\d.]+ +\d+ img/s", stdout, re.M)) == 2
    last = fer.load_checkpoint(out / "last.pt")
    assert last["arch"] == "resnet34" and last["epoch"] == 2
    assert last["classes"] == ["angry", "happy", "sad"] and last["image_size"] == 32
    assert {"state_dict", "optimizer", "best_metric", "args", "mean", "std"} <= last.keys()
    best = fer.load_checkpoint(out / "best.pt")
    assert best["best_metric"] == max(h["val_macro_f1"] for h in last["history"])


def assert_validate_matches_training(out):
    """`validate` rebuilds the run's split (8 images a class, 10% held out: one per
    class) and finds the validation metrics that training saved."""
    ckpt = fer.load_checkpoint(out / "last.pt")
    code, _, err = main_in_process("fer.py", "validate", "--checkpoint", out / "last.pt", "--json", out / "val.json")
    assert code == 0, err
    val = json.loads((out / "val.json").read_text())
    assert sum(val["per_class"][c]["support"] for c in val["classes"]) == 3
    assert val["accuracy"] == pytest.approx(ckpt["val_metrics"]["accuracy"])
    assert val["macro_f1"] == pytest.approx(ckpt["val_metrics"]["macro_f1"])
    return ckpt


def test_validate_rebuilds_the_same_split(trained):
    assert_validate_matches_training(trained[0])


def test_validate_tta_scores_the_views_of_the_validation_split(trained, monkeypatch):
    """`validate --tta flip` scores every validation image with its mirror, so
    the TTA mode can be chosen on validation instead of on the test split."""
    out = trained[0]
    modes = []
    views = fer.tta_views
    monkeypatch.setattr(fer, "tta_views", lambda x, mode: modes.append(mode) or views(x, mode))
    threads = torch.get_num_threads()
    try:
        m = fer.main(["validate", "--checkpoint", str(out / "last.pt"), "--tta", "flip", "--threads", "1",
                      "--json", str(out / "val_flip.json")])
    finally:
        torch.set_num_threads(threads)  # --threads sets it for the whole pytest process
    val = json.loads((out / "val_flip.json").read_text())
    assert modes and set(modes) == {"flip"}
    assert val["tta"] == "flip" and val["macro_f1"] == m["macro_f1"]
    assert sum(val["per_class"][c]["support"] for c in val["classes"]) == 3


def test_test_writes_the_json_report(trained, tiny_data):
    out, _ = trained
    code, stdout, err = main_in_process("fer.py", "test", "--checkpoint", out / "best.pt", "--data", tiny_data,
                                        "--json", out / "test.json")
    assert code == 0, err
    assert "macro avg" in stdout and "rows: true" in stdout
    res = json.loads((out / "test.json").read_text())
    assert res["classes"] == ["angry", "happy", "sad"]
    assert {"accuracy", "macro_f1", "per_class", "confusion_matrix"} <= res.keys()
    assert set(res["per_class"]["sad"]) == {"precision", "recall", "f1", "support"}
    cm = torch.tensor(res["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == 12 and cm.sum(1).tolist() == [4, 4, 4]
    assert res["accuracy"] == pytest.approx(cm.diag().sum().item() / 12)


@pytest.mark.slow
@pytest.mark.parametrize("schedule, mixup, ema", [("onecycle", "0", None), ("plateau", "0", None),
                                                  ("onecycle", "0.4", None), ("onecycle", "0", "0.9")])
def test_resume_continues_to_the_same_weights(schedule, mixup, ema, tiny_data, tmp_path):
    """A run stopped after epoch 1 and resumed ends exactly like an uninterrupted
    one, whether its schedule steps per batch or per epoch, with mixup's random
    blends, and with --ema's average of the weights. The two runs it is checked against run in this process, one
    thread each as in the subprocess; the resume runs in a fresh process, so it
    cannot lean on anything the first epoch left in memory (random state above all)."""
    args = ("--data", tiny_data, *FAST, "--epochs", "2", "--no-amp", "--schedule", schedule, "--mixup", mixup,
            *(("--ema", ema) if ema else ()))
    assert main_in_process("fer.py", "train", *args, "--out", tmp_path / "full")[0] == 0
    train_cut(*args, "--out", tmp_path / "cut")  # stopped as by Ctrl-C after epoch 1
    assert fer.load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1
    if mixup == "0" and not ema:  # a run saved before --mixup and --ema existed resumes as one without them
        ckpt = fer.load_checkpoint(tmp_path / "cut" / "last.pt")
        del ckpt["args"]["mixup"], ckpt["args"]["ema"], ckpt["args"]["split_seed"]  # --seed 0 split it then
        torch.save(ckpt, tmp_path / "cut" / "last.pt")
    r = run_script("fer.py", "train", "--resume", tmp_path / "cut" / "last.pt")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout and "epoch   2/2" in r.stdout
    full = fer.load_checkpoint(tmp_path / "full" / "last.pt")
    cut = fer.load_checkpoint(tmp_path / "cut" / "last.pt")
    assert cut["epoch"] == 2 and state_dicts_equal(full["state_dict"], cut["state_dict"])
    assert cut["scheduler"] == full["scheduler"]
    # stepped per batch (21 training images in batches of 4: 5 steps an epoch) or once per epoch
    assert full["scheduler"]["last_epoch"] == (2 if schedule == "plateau" else 10)
    rates = [[h["lr"] for h in c["history"]] for c in (full, cut)]
    assert rates[0] == rates[1] and len(rates[0]) == 2
    if ema:  # the average and its step count went on as if never stopped
        assert state_dicts_equal(full["ema"], cut["ema"]) and cut["ema"]["n_averaged"] == 10
        best = [fer.load_checkpoint(tmp_path / d / "best.pt")["state_dict"] for d in ("full", "cut")]
        assert state_dicts_equal(*best)


@pytest.mark.slow  # five epochs
def test_plateau_steps_once_an_epoch_on_validation(tiny_data, tmp_path, monkeypatch, call_main):
    """In a run, with no patience, every epoch that brings no new best validation
    Macro-F1 halves the rate of the next one (the epoch lines log the rate)."""
    monkeypatch.setattr(fer, "PLATEAU_PATIENCE", 0)
    code, _, err = call_main("fer.py", "train", "--data", tiny_data, *FAST, "--epochs", "5", "--schedule", "plateau",
                            "--lr", "0.01", "--threads", "1", "--out", tmp_path)
    assert code == 0, err
    best, rate = -1.0, 0.01
    for h in fer.load_checkpoint(tmp_path / "last.pt")["history"]:
        assert h["lr"] == pytest.approx(rate)
        if h["val_macro_f1"] > best:
            best = h["val_macro_f1"]
        else:
            rate /= 2
    assert rate < 0.01  # some epoch brought no new best, so a halving was checked


def test_plateau_halves_the_rate_after_six_epochs_without_a_new_best():
    """--schedule plateau: a new best keeps the rate; the sixth epoch in a row
    without one halves it, and the count starts again."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    scheduler = fer.make_scheduler(argparse.Namespace(schedule="plateau", lr=0.05), optimizer, total_steps=100)
    rates = []
    for f1 in [0.3, 0.4] + [0.4] * 6 + [0.39] * 6:
        scheduler.step(f1)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == [0.05] * 7 + [0.025] * 6 + [0.0125]


def test_mixup_blends_each_image_with_the_one_whose_label_it_returns():
    """Image i is filled with the value i and labelled i, so a blend must equal
    lam * label + (1 - lam) * second label, pixel for pixel."""
    torch.manual_seed(0)
    y = torch.arange(8)
    x = y.float().view(8, 1, 1, 1).expand(8, 3, 4, 4)
    blended = 0
    for _ in range(5):
        mixed, y2, lam = fer.mixup(x, y, 0.4)
        assert 0 <= lam <= 1 and mixed.shape == x.shape
        assert sorted(y2.tolist()) == y.tolist()  # every image is some image's partner
        expected = (lam * y + (1 - lam) * y2).view(8, 1, 1, 1).expand(8, 3, 4, 4)
        assert torch.allclose(mixed, expected)
        blended += 0 < lam < 1 and not torch.equal(y2, y)
    assert blended  # not the identity: some draw mixed two different images


def test_mixup_loss_is_the_blend_of_both_labels_losses(monkeypatch):
    """One step with a fixed blend: the loss is the cross-entropy, with label
    smoothing, of the blended images against the blended labels, computed by the
    network before the step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, y, y2 = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 0])
    monkeypatch.setattr(fer, "mixup", lambda x, y, alpha: (x.flip(0), y2, 0.3))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    with torch.no_grad():
        target = 0.3 * F.one_hot(y, 3).float() + 0.7 * F.one_hot(y2, 3).float()
        expected = F.cross_entropy(model(x.flip(0)), target, label_smoothing=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, _ = fer.train_one_epoch(model, [(x, y)], 1, optimizer, scheduler, scaler, criterion,
                                  runtime.Runtime(torch.device("cpu")), epoch=1, alpha=0.4)
    assert loss == pytest.approx(expected.item())


@pytest.mark.slow  # two runs; the blend itself is checked above, without one
def test_train_mixes_every_batch(tiny_data, tmp_path, monkeypatch, call_main):
    """--mixup ALPHA reaches every training step; 0 leaves the batches alone."""
    calls = []
    monkeypatch.setattr(fer, "mixup", lambda x, y, alpha: calls.append(alpha) or (x, y, 1.0))
    for alpha in ("0", "0.4"):
        code, _, err = call_main("fer.py", "train", "--data", tiny_data, *FAST, "--epochs", "1", "--mixup", alpha,
                                "--threads", "1", "--out", tmp_path / alpha)
        assert code == 0, err
    assert calls == [0.4] * 5  # 21 training images in batches of 4: 5 steps an epoch


def test_in_memory_faces_match_imagefolder(tiny_data):
    faces = fer.load_faces(tiny_data / "train", 40, 3)
    ref = ImageFolder(tiny_data / "train", transform=fer.image_transform(40))
    assert faces.classes == ref.classes
    assert faces.labels.tolist() == ref.targets
    assert faces.images.dtype == torch.uint8 and faces.images.shape == (24, 3, 40, 40)
    assert all(torch.equal(faces.images[i], ref[i][0]) for i in range(len(ref)))


def test_augment_keeps_shape_dtype_and_range():
    torch.manual_seed(0)
    x = fer.normalize(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), "cpu")
    y = fer.augment(x, crop_scale=0.5, rotation=10, erasing=1.0)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.min() >= -1 and y.max() <= 1
    assert not torch.equal(x, y)
    # rotation and crop off: each image is only mirrored or resized by the aspect-ratio jitter
    z = fer.augment(x, crop_scale=1.0, rotation=0, erasing=0)
    assert (z - x).abs().mean() < (y - x).abs().mean()


def test_split_is_stratified_seeded_and_disjoint():
    labels = torch.tensor([0] * 500 + [1] * 1500 + [2] * 1000)
    train, val = fer.split_train_val(labels, 0.1, seed=0)
    assert torch.bincount(labels[val]).tolist() == [50, 150, 100]
    assert len(set(train.tolist()) & set(val.tolist())) == 0 and len(train) + len(val) == 3000
    assert torch.equal(val, fer.split_train_val(labels, 0.1, seed=0)[1])
    assert not torch.equal(val, fer.split_train_val(labels, 0.1, seed=1)[1])


def test_train_never_reads_the_test_split(dry_run):
    """conftest's dry run trained on a --data folder with train/ alone; validate needs
    no test/ either."""
    data = Path(fer.load_checkpoint(dry_run / "last.pt")["args"]["data"])
    assert (data / "train").is_dir() and not (data / "test").exists()
    code, _, err = main_in_process("fer.py", "validate", "--checkpoint", dry_run / "last.pt")
    assert code == 0, err


def test_every_option_states_its_default():
    """`--help` of every command of fer.py, and of every other script, says the
    default of each optional setting."""
    commands = next(a for a in fer.build_parser()._actions if a.dest == "command").choices
    parsers = {f"fer.py {name}": parser for name, parser in commands.items()}
    parsers.update({script: module.build_parser() for script, module in SCRIPTS.items() if script != "fer.py"})
    assert set(commands) == {"train", "validate", "test"}
    assert {"predict.py", "bench.py", "prepare.py", "export.py"} <= parsers.keys()
    for name, parser in parsers.items():
        for action in parser._actions:
            if action.option_strings and not action.required and action.dest not in ("help", "dry_run"):
                assert "default" in (action.help or ""), f"{name} {action.option_strings[0]}"


@pytest.mark.parametrize("command", ["predict", "prepare", "bench", "export"])
def test_the_commands_that_became_scripts_are_not_fer_commands(command, call_main):
    """fer.py knows train, validate and test; predict, prepare, bench and export are
    scripts of their own now (predict.py, ...), and fer.py refuses them in one line."""
    code, out, err = call_main("fer.py", command, "samples")
    assert_error(code, err, f"invalid choice: '{command}'", "train", "validate", "test")
    assert out == ""


@pytest.mark.slow
def test_torchrun_two_processes_match_validate(tiny_data, tmp_path):
    """DDP on CPU (gloo): rank 0 prints and writes the checkpoint, --resume works
    under torchrun, and the validation metrics, computed over the whole split, equal
    those of `validate` on the saved checkpoint. The run to resume is cut as Ctrl-C
    cuts it, in this process (a --dry-run is a whole one-epoch run, nothing to resume)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(ROOT / "fer.py"), "train"]
    args = ("--data", tiny_data, *FAST, "--epochs", "2", "--no-amp", "--ema", "0.9")
    out = tmp_path / "ddp"
    r = subprocess.run([*torchrun, *map(str, args), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 processes" in r.stdout  # only rank 0 prints:
    assert r.stdout.count("epoch   1/2") == 1 and r.stdout.count("epoch   2/2") == 1, r.stdout
    cut = tmp_path / "cut"
    train_cut(*args, "--threads", "1", "--out", cut)
    r = subprocess.run([*torchrun, "--resume", str(cut / "last.pt")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stdout and "2 processes" in r.stdout and r.stdout.count("epoch   2/2") == 1, r.stdout
    for run in (out, cut):
        ckpt = assert_validate_matches_training(run)
        assert ckpt["epoch"] == 2 and not any(k.startswith("module.") for k in ckpt["state_dict"])
        assert not any(k.startswith("module.module.") for k in ckpt["ema"])  # the average is of the raw network


def test_resume_refuses_options_it_would_ignore(trained, cli):
    out, _ = trained
    code, _, err = cli("fer.py", "train", "--resume", out / "last.pt", "--lr", "0.1", "--epochs", "9")
    assert code == 2 and "Traceback" not in err
    assert "--epochs, --lr" in err and "new run" in err


def test_hidden_files_in_class_folders_are_not_images(tiny_data, tmp_path):
    root = tmp_path / "train"
    shutil.copytree(tiny_data / "train", root)
    (root / "sad" / "._000.jpg").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (root / "sad" / ".ipynb_checkpoints").mkdir()
    shutil.copy(root / "sad" / "000.jpg", root / "sad" / ".ipynb_checkpoints" / "000.jpg")
    faces = fer.load_faces(root, 32, 1)
    assert len(faces.files) == 24 and not any("/." in f for f in faces.files)


def test_classes_read_what_a_folder_of_links_reads(tiny_data, tmp_path):
    """--classes picks some class folders; the earlier way, class folders that are
    symbolic links, reads the same faces in the same order (so the same split)."""
    for name in ("angry", "sad"):
        (tmp_path / name).symlink_to(tiny_data / "train" / name, target_is_directory=True)
    linked = fer.load_faces(tmp_path, 32, 1)
    picked = fer.load_faces(tiny_data / "train", 32, 1, classes=["sad", "angry"])
    assert linked.classes == picked.classes == ["angry", "sad"] and picked.labels.tolist() == [0] * 8 + [1] * 8
    assert torch.equal(linked.images, picked.images) and torch.equal(linked.labels, picked.labels)
    assert torch.equal(picked.images, fer.load_faces(tiny_data / "train", 32, 1).images[[*range(8), *range(16, 24)]])


@pytest.mark.slow  # a training run of its own; the in-memory pipeline trains in the quick tests
def test_report_pipeline_trains_on_grayscale(tiny_data, tmp_path):
    """--pipeline pil: the report's per-image PIL transforms, here with one channel."""
    code, _, err = main_in_process("fer.py", "train", "--data", tiny_data, *FAST, "--epochs", "1", "--pipeline", "pil",
                                   "--in-channels", "1", "--workers", "0", "--no-amp", "--out", tmp_path)
    assert code == 0, err
    assert fer.load_checkpoint(tmp_path / "last.pt")["in_channels"] == 1


FER5 = ROOT.parent / "shared" / "data" / "fer5"


# What a shipped checkpoint's JSON must hold besides `tta`: `fer.py test --json`'s figures.
SHIPPED_KEYS = {"arch", "classes", "accuracy", "macro_f1", "per_class", "confusion_matrix"}


@pytest.mark.slow
@pytest.mark.skipif(not (FER5 / "test").is_dir(), reason="needs ../shared/data/fer5")
@pytest.mark.parametrize("stem, tta", [("resnet34_fer5_224", "none"), ("googlenet_fer5_224", "none"),
                                       ("googlenet_fer5_224", "flip"), ("googlenet_fer2013-5class_64", "none")])
def test_shipped_checkpoint_reproduces_its_metrics(stem, tta, tmp_path):
    """checkpoints/STEM.json holds what `fer.py test --checkpoint checkpoints/STEM.pt
    --data data/fer5 --json` writes, with, under "tta", the same for each test-time
    augmentation measured: {"flip": {...}, "tencrop": {...}}. Every figure, exactly.
    ResNet34's ten-crop is left out: ten views at 224 px take minutes on 2 cores."""
    path = ROOT / "checkpoints" / f"{stem}.json"
    if not path.is_file():  # the JSONs are being moved to one per checkpoint, named like it
        pytest.skip(f"{path.relative_to(ROOT)} is not written yet (one JSON per .pt, with its TTA under \"tta\")")
    code, _, err = main_in_process("fer.py", "test", "--checkpoint", ROOT / "checkpoints" / f"{stem}.pt",
                                   "--data", FER5, "--tta", tta, "--json", tmp_path / "m.json")
    assert code == 0, err
    shipped = json.loads(path.read_text())
    assert SHIPPED_KEYS <= shipped.keys() and isinstance(shipped.get("tta", {}), dict), sorted(shipped)
    if tta != "none":
        assert tta in shipped.get("tta", {}), f"{path.name} has no \"tta\": {{\"{tta}\": ...}}"
        shipped = shipped["tta"][tta]
        assert {"accuracy", "macro_f1", "confusion_matrix"} <= shipped.keys(), sorted(shipped)
    result = json.loads((tmp_path / "m.json").read_text())
    # Every figure the shipped JSON holds, exactly; `members` names the file by the path given,
    # the top level's `tta` holds the other modes, and JSONs written before ensembles and
    # --labels lack the keys those added.
    figures = {k: v for k, v in shipped.items() if k != "members" and not (k == "tta" and isinstance(v, dict))}
    assert {k: result[k] for k in figures} == figures


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_optimisers_are_fused_on_a_cpu(optimizer):
    """One fused kernel per step, not a loop over the tensors (2x AlexNet's speed)."""
    opt = fer.make_optimizer(nn.Linear(4, 2), optimizer, 0.01, 5e-4)
    assert opt.defaults["fused"] is True and type(opt).__name__.lower() == optimizer


# ----------------------------------------------------------------------------
# Test-time augmentation and reading pictures (validate, test and predict.py)

def test_tta_views_shapes():
    x = torch.rand(2, 3, 32, 24)
    for mode, count in (("none", 1), ("flip", 2), ("tencrop", 10)):
        views = fer.tta_views(x, mode)
        assert len(views) == count and all(v.shape == x.shape for v in views)
    assert torch.equal(fer.tta_views(x, "flip")[1], x.flip(-1))
    crops = fer.tta_views(x, "tencrop")
    assert all(torch.equal(crops[k + 5], crops[k].flip(-1)) for k in range(5))
    with pytest.raises(fer.FerError, match="tencrop"):
        fer.tta_views(x, "tencorp")


def test_flip_on_a_symmetric_image_equals_none():
    torch.manual_seed(0)
    model = nets.MODELS["resnet34"](num_classes=3).eval()
    rt = runtime.Runtime(torch.device("cpu"))  # float32: the comparison is exact
    g = torch.Generator().manual_seed(0)
    probs = lambda images, tta: fer.predict_probs(model, images, rt, 3, tta)  # noqa: E731
    h = torch.randint(0, 256, (4, 3, 32, 16), generator=g, dtype=torch.uint8)
    x = torch.cat([h, h.flip(-1)], -1)  # mirror-symmetric: its flip view is itself
    assert torch.equal(probs(x, "flip"), probs(x, "none"))
    # Not because the network is mirror-symmetric (it is not): on an asymmetric image
    # flip differs from none, and is the mean of the image's and its mirror's softmax.
    a = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    assert not torch.allclose(probs(a, "none"), probs(a.flip(-1), "none"), atol=1e-4)
    torch.testing.assert_close(probs(a, "flip"), (probs(a, "none") + probs(a.flip(-1), "none")) / 2)


def test_pictures_are_read_upright_as_their_exif_says(tmp_path):
    """A phone stores a portrait photo on its side with an orientation tag (6: turn it a
    quarter clockwise): every reader, whole picture or detected face, turns it upright."""
    img = Image.new("L", (8, 4))
    img.putpixel((0, 0), 255)  # top left as stored: top right once upright
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "side.png", exif=exif)
    upright = fer.open_image(tmp_path / "side.png", 1)
    assert upright.size == (4, 8) and upright.getpixel((3, 0)) == 255
