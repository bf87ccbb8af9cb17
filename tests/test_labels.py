"""Which labels a run trains and is scored on: `train --classes` (some of the class
folders) and `test --labels`, FER2013's by default (the FER+ crowd majority:
test_ferplus.py)."""
import json
import shutil

import pytest
import torch

import fer
from conftest import FAST, train_cut


@pytest.fixture(scope="module")
def two_classes(tiny_data, tmp_path_factory):
    """A run of 2 epochs on two of the three class folders, stopped as by Ctrl-C after
    the first: its best.pt to score, its last.pt to resume (elsewhere: it stays as it is)."""
    out = tmp_path_factory.mktemp("two_classes")
    train_cut("--data", tiny_data, *FAST, "--epochs", "2", "--no-amp", "--threads", "1", "--classes", "sad,angry",
              "--out", out)
    return out


def test_train_on_some_class_folders(two_classes, tiny_data, tmp_path, call_main):
    out = two_classes
    ckpt = fer.load_checkpoint(out / "best.pt")
    assert ckpt["classes"] == ["angry", "sad"] and ckpt["args"]["classes"] == ["sad", "angry"]
    assert ckpt["state_dict"]["fc.weight"].shape[0] == 2
    # validate rebuilds the same two-class split from what the checkpoint stores
    code, out_text, err = call_main("fer.py", "validate", "--checkpoint", out / "best.pt", "--threads", "1")
    assert code == 0 and "2 images" in out_text, err  # 8 a class, 10% each (at least one)
    # test scores the same classes of the three-class test folder; one without sad/ is refused
    code, _, err = call_main("fer.py", "test", "--checkpoint", out / "best.pt", "--data", tiny_data, "--threads", "1",
                            "--json", tmp_path / "t.json")
    result = json.loads((tmp_path / "t.json").read_text())
    assert code == 0 and result["classes"] == ["angry", "sad"] and sum(map(sum, result["confusion_matrix"])) == 8
    for c in ("angry", "happy"):
        shutil.copytree(tiny_data / "test" / c, tmp_path / "no_sad" / "test" / c)
    code, _, err = call_main("fer.py", "test", "--checkpoint", out / "best.pt", "--data", tmp_path / "no_sad", "--threads", "1")
    assert code == 2 and "has no class folder sad" in err and len(err.strip().splitlines()) == 1, err


def test_classes_resume_with_the_run(two_classes, tmp_path, call_main):
    """--resume trains on the run's classes, as its checkpoint says; here into another
    --out, so the module's run stays as it is."""
    out = tmp_path / "resumed"
    code, text, err = call_main("fer.py", "train", "--resume", two_classes / "last.pt", "--out", out, "--threads", "1")
    assert code == 0 and "of 2 classes (angry, sad)" in text and "epoch   2/2" in text, err
    resumed = fer.load_checkpoint(out / "last.pt")
    assert resumed["classes"] == ["angry", "sad"] and resumed["args"]["classes"] == ["sad", "angry"]
    assert resumed["epoch"] == 2 and fer.load_checkpoint(two_classes / "last.pt")["epoch"] == 1


@pytest.mark.parametrize("value, message", [
    ("angry,fear", "has no class folder fear; --classes takes some of angry, happy, sad"),
    ("angry", "is not a list of two or more different class folder names"),
    ("angry,angry", "is not a list of two or more different class folder names"),
    ("angry,,sad", "is not a list of two or more different class folder names"),
])
def test_bad_classes_are_refused_in_one_line(tiny_data, tmp_path, call_main, value, message):
    code, _, err = call_main("fer.py", "train", "--data", tiny_data, *FAST, "--classes", value, "--out", tmp_path / "r")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r" / "last.pt").exists()


def test_labels_fer2013_is_the_default_and_recorded(tiny_run, tiny_data, tmp_path, call_main):
    assert call_main("fer.py", "test", "--checkpoint", tiny_run[0] / "best.pt", "--data", tiny_data,
                    "--json", tmp_path / "t.json", "--threads", "1")[0] == 0
    assert json.loads((tmp_path / "t.json").read_text())["labels"] == "fer2013"
    assert torch.tensor(json.loads((tmp_path / "t.json").read_text())["confusion_matrix"]).sum() == 12
