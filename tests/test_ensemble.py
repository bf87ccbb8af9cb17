"""Ensembles: fer.py validate and test, and predict.py, given --checkpoint once per
checkpoint, average the members' class probabilities, each member at its own image
size; members of other classes, or validated on other splits, are refused in one line.

Two tiny members: conftest's shared run (resnet34 at 32 px), and its weights once more
as a network that reads 40 px faces (ResNet34 takes any size), so both hold out the
same validation faces and each decodes the images at its own size."""
import json

import pytest
import torch

from conftest import assert_error, main_in_process

THREADS = ("--threads", "1")


@pytest.fixture(scope="module")
def members(tiny_run, tmp_path_factory):
    """Two checkpoints of the same classes and validation split: 32 px and 40 px. (A
    second run at 40 px, trained, was seconds of the quick suite for the same checks.)"""
    out = tmp_path_factory.mktemp("member40")
    a = tiny_run[0] / "best.pt"
    return a, changed(a, out / "best.pt", lambda c: c.update(image_size=40))


def changed(path, dest, change):
    """A copy of checkpoint `path` at `dest`, edited by change(ckpt)."""
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, dest)
    return dest


def predict_json(tmp_path, name, paths, *checkpoints):
    out = tmp_path / f"{name}.json"
    repeated = [a for ckpt in checkpoints for a in ("--checkpoint", ckpt)]
    code, _, err = main_in_process("predict.py", *paths, *repeated, "--tta", "flip",
                                   "--json", out, *THREADS)
    assert code == 0, err
    return json.loads(out.read_text())


def test_predict_averages_the_members_each_at_its_own_size(members, tiny_data, tmp_path):
    a, b = members
    paths = [tiny_data / "test" / "happy", tiny_data / "test" / "sad" / "000.jpg"]
    alone = [predict_json(tmp_path, name, paths, ckpt) for name, ckpt in (("a", a), ("b", b))]
    both = predict_json(tmp_path, "both", paths, a, b)
    assert both["arch"] == "ensemble" and both["tta"] == "flip"
    assert [(m["checkpoint"], m["image_size"]) for m in both["members"]] == [(str(a), 32), (str(b), 40)]
    assert alone[0]["members"] == both["members"][:1] and alone[0]["arch"] == "resnet34"
    assert len(both["predictions"]) == 5
    for p, pa, pb in zip(both["predictions"], *(r["predictions"] for r in alone)):
        assert p["file"] == pa["file"] == pb["file"]
        for c, v in p["probabilities"].items():  # each figure rounded to 4 places
            assert v == pytest.approx((pa["probabilities"][c] + pb["probabilities"][c]) / 2, abs=1.5e-4)


@pytest.mark.parametrize("command", ["validate", "test"])
def test_json_gives_the_ensembles_metrics_and_each_members(command, members, tiny_data, tmp_path):
    a, b = members
    data = () if command == "validate" else ("--data", tiny_data)
    code, _, err = main_in_process("fer.py", command, "--checkpoint", a, *data, *THREADS, "--json", tmp_path / "a.json")
    assert code == 0, err
    code, out, err = main_in_process("fer.py", command, "--checkpoint", a, "--checkpoint", b, *data, *THREADS, "--json", tmp_path / "ab.json")
    assert code == 0, err
    alone, both = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("a", "ab"))
    assert "an ensemble of 2" in out and f"  {b}: resnet34 epoch" in out  # a line per member
    assert both["arch"] == "ensemble" and [m["checkpoint"] for m in both["members"]] == [str(a), str(b)]
    assert sum(map(sum, both["confusion_matrix"])) == (3 if command == "validate" else 12)
    first = both["members"][0]  # the first member's own figures, as it scores alone
    assert {k: first[k] for k in ("accuracy", "macro_f1", "confusion_matrix")} == \
        {k: alone[k] for k in ("accuracy", "macro_f1", "confusion_matrix")}
    assert len(alone["members"]) == 1 and alone["members"][0]["confusion_matrix"] == alone["confusion_matrix"]
    assert {"per_class", "image_size", "epoch", "weights"} <= both["members"][1].keys()


@pytest.mark.parametrize("how", ["order", "names"])
@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_members_of_other_classes_are_refused(command, how, members, tiny_data, tmp_path, call_main):
    a, _ = members
    classes = ["happy", "angry", "sad"] if how == "order" else ["angry", "happy", "sadness"]
    other = changed(a, tmp_path / "other.pt", lambda c: c.update(classes=classes))
    if command == "predict":
        code, _, err = call_main("predict.py", tiny_data / "test", "--checkpoint", a, "--checkpoint", other, *THREADS)
    else:
        code, _, err = call_main("fer.py", command, "--checkpoint", a, "--checkpoint", other, "--data", tiny_data,
                                 *THREADS)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"{other} was trained on classes {classes}" in err and "same classes in the same order" in err


def test_validate_refuses_members_of_other_splits_and_test_takes_them(members, tiny_data, tmp_path, call_main):
    a, _ = members
    other = changed(a, tmp_path / "split1.pt", lambda c: c["args"].update(split_seed=1))
    code, _, err = call_main("fer.py", "validate", "--checkpoint", a, "--checkpoint", other, *THREADS)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "with split seed 0" in err and "with split seed 1" in err, err
    assert "same --data, --val-fraction and --split-seed" in err
    assert call_main("fer.py", "test", "--checkpoint", a, "--checkpoint", other, "--data", tiny_data, *THREADS)[0] == 0


def test_seeds_share_the_split_and_old_runs_split_by_their_seed(members, tmp_path, call_main):
    """--seed moves the initialisation and the batches, not the validation faces: runs
    of other seeds validate as one ensemble. Runs saved before --split-seed existed
    split by --seed, and are read so."""
    a, _ = members
    seed1 = changed(a, tmp_path / "seed1.pt", lambda c: c["args"].update(seed=1))
    assert call_main("fer.py", "validate", "--checkpoint", a, "--checkpoint", seed1, *THREADS)[0] == 0
    old = changed(a, tmp_path / "old.pt", lambda c: (c["args"].pop("split_seed"), c["args"].update(seed=1)))
    code, _, err = call_main("fer.py", "validate", "--checkpoint", a, "--checkpoint", old, *THREADS)
    assert code == 2 and "with split seed 1" in err, err


@pytest.mark.parametrize("command", ["validate", "test"])
def test_a_list_after_checkpoint_says_to_repeat_it(command, members, tiny_data, call_main):
    """--checkpoint takes one file per use: the old `--checkpoint a.pt b.pt` gets one
    line that says to repeat it, before any checkpoint is read (predict.py's own
    refusal: test_predict.py)."""
    a, b = members
    data = ("--data", tiny_data) if command == "test" else ()
    code, out, err = call_main("fer.py", command, "--checkpoint", a, b, *data, *THREADS)
    assert_error(code, err, f"unrecognized arguments: {b}", "--checkpoint takes one file: repeat it for an ensemble",
                 "(--checkpoint a.pt --checkpoint b.pt)")
    assert out == ""
