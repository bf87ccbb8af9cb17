"""What a training run leaves and shows: the run folder (best.pt, last.pt,
history.csv, curves.png), schedules of short runs, and recipes. (The progress line
inside an epoch is runtime.py's: test_runtime.py.)"""
import argparse
import csv
import json

import pytest
import torch
from PIL import Image

import fer
import runs
from conftest import train_cut

FAST = ("--model", "resnet34", "--image-size", "32", "--batch-size", "4", "--threads", "1")


@pytest.fixture(scope="module")
def run(tiny_run):
    """conftest's two-epoch run on the tiny data, read only: its run folder."""
    return tiny_run[0]


def test_run_folder_holds_history_and_curves(run):
    last = fer.load_checkpoint(run / "last.pt")
    with open(run / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "loss", "val_accuracy", "val_macro_f1", "lr", "seconds"]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r, h in zip(rows, last["history"]):
        assert all(float(r[k]) == pytest.approx(h[k], rel=1e-5) for k in runs.HISTORY_COLUMNS)
    with Image.open(run / "curves.png") as img:
        assert img.format == "PNG" and img.size == (960, 360)
        assert len(img.convert("RGB").getcolors(1 << 16)) > 10  # lines drawn, not a blank canvas


def test_best_pt_keeps_what_evaluation_needs_and_last_pt_what_resume_needs(run, tiny_data, call_main):
    best, last = fer.load_checkpoint(run / "best.pt"), fer.load_checkpoint(run / "last.pt")
    assert not {"optimizer", "scheduler", "scaler"} & best.keys()
    assert {"optimizer", "scheduler", "scaler"} <= last.keys()
    assert {"arch", "classes", "args", "epoch", "val_metrics", "state_dict"} <= best.keys()
    assert best["epoch"] == best["best_epoch"] and best["val_metrics"]["macro_f1"] == best["best_metric"]
    assert call_main("fer.py", "test", "--checkpoint", run / "best.pt", "--data", tiny_data, "--threads", "1")[0] == 0
    code, _, err = call_main("fer.py", "train", "--resume", run / "best.pt")
    assert code == 2 and "no training state" in err and "last.pt" in err, err


def rates_used(schedule, total_steps, lr=0.05):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    scheduler = fer.make_scheduler(argparse.Namespace(schedule=schedule, lr=lr), optimizer, total_steps)
    rates = []
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("total_steps", [3, 4, 5, 7, 10, 11])
def test_onecycle_warms_up_peaks_and_decays_in_any_short_run(total_steps):
    rates = rates_used("onecycle", total_steps)
    peak = rates.index(max(rates))
    assert rates[0] == pytest.approx(0.05 / 25) and max(rates) == pytest.approx(0.05, rel=0.05)  # the peak step
    assert 1 <= peak < total_steps - 1 and rates[-1] == min(rates) == pytest.approx(0.05 / 25 / 1e4)
    assert rates[:peak + 1] == sorted(rates[:peak + 1]) and rates[peak:] == sorted(rates[peak:], reverse=True)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_cosine_and_constant_start_at_the_rate_even_for_one_step(schedule):
    assert rates_used(schedule, 1) == [0.05]
    rates = rates_used(schedule, 4)
    assert rates[0] == 0.05 and rates == sorted(rates, reverse=True) and min(rates) > 0


def test_onecycle_under_three_steps_is_refused_in_one_line(tiny_data, tmp_path, call_main):
    # 21 training images in one batch of 64: one step an epoch, two in all
    code, _, err = call_main("fer.py", "train", "--data", tiny_data, "--model", "resnet34", "--image-size", "32",
                            "--epochs", "2", "--threads", "1", "--out", tmp_path)
    assert code == 2 and err.count("\n") == 1, err
    assert "needs at least 3 steps" in err and "this run has 2" in err and "--schedule constant" in err


def test_logged_rate_is_the_last_steps(tiny_data, tmp_path, call_main):
    """A 3-step OneCycle run (one epoch of 3 batches of 7): the epoch used the peak and
    ended at the lowest rate, and that last rate is what history and the line show."""
    code, out, err = call_main("fer.py", "train", "--data", tiny_data, "--model", "resnet34", "--image-size", "32",
                              "--batch-size", "7", "--epochs", "1", "--threads", "1", "--out", tmp_path)
    assert code == 0, err
    (h,) = fer.load_checkpoint(tmp_path / "last.pt")["history"]
    assert h["lr"] == pytest.approx(0.05 / 25 / 1e4) and "lr 2.00e-07" in out
    assert "\r" not in out  # captured, not a terminal: no in-place progress line


def test_report_recipe_records_its_values_and_options_override_it(tiny_data, tmp_path, call_main):
    code, _, err = call_main("fer.py", "train", "--data", tiny_data, "--recipe", "report", "--model", "googlenet",
                            "--image-size", "32", "--threads", "1", "--dry-run", "--out", tmp_path)
    assert code == 0, err
    last = fer.load_checkpoint(tmp_path / "last.pt")
    a = last["args"]
    assert a["recipe"] == "report" and a["image_size"] == 32  # given explicitly: wins over 224
    report = dict(optimizer="adam", lr=3e-4, batch_size=32, epochs=100, schedule="constant", weight_decay=0.0,
                  label_smoothing=0.0, crop_scale=0.08, rotation=0.0, erasing=0.0)
    # a dry run is a whole run of one epoch: every value of the recipe but its 100 epochs
    assert {k: a[k] for k in report} == {**report, "epochs": 1} and last["dry_run"]
    chosen = fer.build_parser().parse_args(["train", "--recipe", "report", "--model", "googlenet",
                                            "--image-size", "32"])
    fer.resolve_train_args(chosen)
    assert {k: getattr(chosen, k) for k in report} == report and chosen.image_size == 32
    # validate needs nothing retyped; --resume refuses a recipe it would ignore
    assert call_main("fer.py", "validate", "--checkpoint", tmp_path / "best.pt", "--threads", "1")[0] == 0
    code, _, err = call_main("fer.py", "train", "--resume", tmp_path / "last.pt", "--recipe", "ours")
    assert code == 2 and "drop --recipe" in err, err


def test_every_network_has_both_recipes_and_help_shows_them(capsys):
    assert set(fer.RECIPES) == {"ours", "report"}
    assert set(fer.RECIPES["ours"]) == set(fer.RECIPES["report"]) == set(fer.MODELS)
    table = fer.recipe_table()
    assert "resnet34   report  adam       0.0001  16     80      224   constant  crop 0.08-1, flip" in table
    assert "alexnet    report  adam       0.0002  32     100" in table


def test_the_default_recipe_is_ours_and_short_is_gone(tmp_path, call_main):
    """Without --recipe, ours: ResNet34 at 64 px for 60 epochs, on every CPU. The
    short recipe (48 px, 40 epochs) was removed: --recipe short is refused in one
    line before any work, as a choice argparse does not know."""
    chosen = fer.build_parser().parse_args(["train", "--device", "cpu"])
    fer.resolve_train_args(chosen)
    assert (chosen.recipe, chosen.model, chosen.image_size, chosen.epochs) == ("ours", "resnet34", 64, 60)
    code, out, err = call_main("fer.py", "train", "--recipe", "short", "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("fer.py train: error: argument --recipe: invalid choice: 'short'"), err
    assert out == "" and not (tmp_path / "out").exists()


def test_readme_shows_the_recipes_as_train_help_does():
    """The README's recipe table is train --help's, row for row."""
    readme = (fer.Path(fer.__file__).parent / "README.md").read_text()
    for line in fer.recipe_table().splitlines()[2:]:
        net, *rest = line.split(None, 8)
        assert "| " + " | ".join([f"`{net}`", *rest]) + " |" in readme, line


def state_dicts_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("winner", ["ema", pytest.param("raw", marks=pytest.mark.slow)])  # a run each
def test_ema_best_pt_keeps_the_weights_that_validated_better(winner, tiny_data, tmp_path, monkeypatch, call_main):
    """With --ema each epoch validates the raw weights, then the averaged ones. The
    validation is rigged so that `winner` scores perfectly and the other not at all:
    best.pt must hold the winner's weights (BatchNorm statistics included), say which,
    and be a plain checkpoint that `validate` scores as training saw it."""
    real, seen = fer.evaluate, []

    def rigged(model, faces, idx, rt, batch_size):
        cm = real(model, faces, idx, rt, batch_size)
        seen.append(cm)
        wins = (len(seen) % 2 == 0) == (winner == "ema")  # the raw weights first, then the average
        return cm.sum(1).diag() if wins else cm.sum(1).diag().roll(1, 1)  # all right, or all wrong

    monkeypatch.setattr(fer, "evaluate", rigged)
    # batches of 7: 3 steps (21 training images), the fewest onecycle takes
    code, out, err = call_main("fer.py", "train", "--data", tiny_data, *FAST, "--batch-size", "7", "--epochs", "1",
                               "--no-amp", "--ema", "0.5", "--out", tmp_path)
    monkeypatch.setattr(fer, "evaluate", real)
    assert code == 0, err
    assert "ema acc" in out and len(seen) == 2
    best, last = fer.load_checkpoint(tmp_path / "best.pt"), fer.load_checkpoint(tmp_path / "last.pt")
    average = {k.removeprefix("module."): v for k, v in last["ema"].items() if k != "n_averaged"}
    assert last["ema"]["n_averaged"] == 3 and not state_dicts_equal(average, last["state_dict"])  # 3 steps
    assert last["weights"] == "raw" and best["weights"] == winner and "ema" not in best
    assert state_dicts_equal(best["state_dict"], average if winner == "ema" else last["state_dict"])
    assert best["best_metric"] == best["val_metrics"]["macro_f1"] == 1.0
    raw = fer.load_checkpoint(tmp_path / "best_raw.pt")  # the raw weights' best, whichever won
    assert raw["weights"] == "raw" and state_dicts_equal(raw["state_dict"], last["state_dict"])
    assert raw["best_epoch"] == 1 and raw["best_metric"] == raw["val_metrics"]["macro_f1"] == (winner == "raw")
    with open(tmp_path / "history.csv", newline="") as f:
        assert next(csv.reader(f))[-2:] == ["ema_val_accuracy", "ema_val_macro_f1"]
    code, _, err = call_main("fer.py", "validate", "--checkpoint", tmp_path / "best.pt", "--threads", "1",
                            "--json", tmp_path / "val.json")
    assert code == 0, err
    scored = seen[1] if winner == "ema" else seen[0]  # what training's (unrigged) evaluation found
    assert json.loads((tmp_path / "val.json").read_text())["confusion_matrix"] == scored.tolist()


@pytest.mark.slow  # a two-epoch run with --ema
def test_ema_leaves_the_raw_run_as_it_was(tiny_run, tiny_data, tmp_path, call_main):
    """The average only reads the weights: a run with --ema trains the raw network step
    for step as the run without it, and its best_raw.pt is that run's best.pt. So one
    run measures the recipe with and without the average. The run without it is
    conftest's tiny_run, which has these very options."""
    args = ("--data", tiny_data, *FAST, "--epochs", "2", "--no-amp")
    plain_out = tiny_run[0]
    run_args = fer.load_checkpoint(plain_out / "last.pt")["args"]
    assert {k: run_args[k] for k in ("data", "model", "image_size", "batch_size", "epochs", "amp", "ema")} == dict(
        data=str(tiny_data), model="resnet34", image_size=32, batch_size=4, epochs=2, amp=False, ema=None)
    assert call_main("fer.py", "train", *args, "--ema", "0.5", "--out", tmp_path / "ema")[0] == 0
    plain, ema = (fer.load_checkpoint(d / "last.pt") for d in (plain_out, tmp_path / "ema"))
    assert state_dicts_equal(plain["state_dict"], ema["state_dict"])
    assert [h["val_macro_f1"] for h in plain["history"]] == [h["val_macro_f1"] for h in ema["history"]]
    best, best_raw = (fer.load_checkpoint(p) for p in (plain_out / "best.pt", tmp_path / "ema" / "best_raw.pt"))
    assert best["epoch"] == best_raw["epoch"] and state_dicts_equal(best["state_dict"], best_raw["state_dict"])
    assert not (plain_out / "best_raw.pt").exists()


@pytest.mark.slow  # two runs
def test_seed_leaves_the_validation_split_to_split_seed(tiny_data, tmp_path, monkeypatch, call_main):
    """--seed changes the initialisation and the batches, never which faces are held
    out: train and validate split by --split-seed, which the checkpoint records."""
    seeds, real = [], fer.split_train_val
    monkeypatch.setattr(fer, "split_train_val", lambda labels, fraction, seed: seeds.append(seed) or
                        real(labels, fraction, seed))
    for split in (None, "2"):
        out = tmp_path / f"split{split}"
        code, _, err = call_main("fer.py", "train", "--data", tiny_data, *FAST, "--epochs", "1", "--no-amp", "--seed", "3",
                                *(("--split-seed", split) if split else ()), "--out", out)
        assert code == 0, err
        assert call_main("fer.py", "validate", "--checkpoint", out / "best.pt", "--threads", "1")[0] == 0
        assert seeds[-2:] == [int(split or 0)] * 2
        assert fer.load_checkpoint(out / "best.pt")["args"]["split_seed"] == int(split or 0)


@pytest.mark.slow  # two two-epoch runs
def test_watch_test_is_written_down_and_never_chooses(tiny_data, tmp_path, monkeypatch, call_main):
    """--watch-test scores DATA/test after every epoch into history.csv, and nothing
    else. The evaluation is rigged so that validation prefers epoch 1 and the test
    split epoch 2: the run with the option keeps epoch 1, with the same best.pt and
    last.pt weights as the run without it, and its history shows what the test split
    would have chosen."""
    real = fer.evaluate

    def rigged(model, faces, idx, rt, batch_size):
        cm = real(model, faces, idx, rt, batch_size)
        epoch = len(rigged.seen[faces.files[0]]) + 1 if faces.files[0] in rigged.seen else 1
        rigged.seen.setdefault(faces.files[0], []).append(epoch)
        wins = epoch == (2 if "/test/" in faces.files[0].replace("\\", "/") else 1)
        return cm.sum(1).diag() if wins else cm.sum(1).diag().roll(1, 1)  # all right, or all wrong

    monkeypatch.setattr(fer, "evaluate", rigged)
    results = {}
    for watch in (False, True):
        rigged.seen = {}
        out = tmp_path / f"watch{watch}"
        code, stdout, err = call_main("fer.py", "train", "--data", tiny_data, *FAST, "--epochs", "2", "--no-amp",
                                     *(("--watch-test",) if watch else ()), "--out", out)
        assert code == 0, err
        assert len(rigged.seen) == 1 + watch  # the test split is read only with the option
        results[watch] = [fer.load_checkpoint(out / p) for p in ("best.pt", "last.pt")] + [stdout, out]
    monkeypatch.setattr(fer, "evaluate", real)
    (best0, last0, _, _), (best1, last1, stdout, out) = results[False], results[True]
    assert best0["epoch"] == best1["epoch"] == last1["best_epoch"] == 1
    assert state_dicts_equal(best0["state_dict"], best1["state_dict"])
    assert state_dicts_equal(last0["state_dict"], last1["state_dict"])
    assert last1["args"]["watch_test"] is True and last0["args"]["watch_test"] is False
    with open(out / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["test_accuracy"]) for r in rows] == [0.0, 1.0]  # the test split would choose epoch 2
    assert [float(r["val_accuracy"]) for r in rows] == [1.0, 0.0]
    assert stdout.count("watched, not used: test acc") == 2


@pytest.mark.slow  # a run cut after one epoch, then resumed
def test_watch_test_is_kept_on_resume(tiny_data, tmp_path, call_main):
    """--resume continues a --watch-test run with it, and refuses the option given again."""
    args = ("--data", tiny_data, *FAST, "--no-amp", "--out", tmp_path)
    train_cut(*args, "--epochs", "2", "--watch-test")  # stopped as by Ctrl-C after epoch 1
    code, out, err = call_main("fer.py", "train", "--resume", tmp_path / "last.pt", "--threads", "1")
    assert code == 0, err
    assert "epoch   2/2" in out and "watched, not used" in out
    code, _, err = call_main("fer.py", "train", "--resume", tmp_path / "last.pt", "--watch-test")
    assert code == 2 and "drop --watch-test" in err
