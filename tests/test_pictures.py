"""pictures.py: every drawing (the confusion matrix, the test's mistakes, predict's
cards, faces boxed in photos, training curves) has the size its arguments promise,
on any machine, and is written atomically by save_png; and `fer.py test --save-dir`
writes them."""
import json
import math

import pytest
import torch
from PIL import Image, ImageFont

import fer
import pictures
from conftest import CLASSES, main_in_process

THREADS = ("--threads", "1")
FER7 = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]


@pytest.fixture(scope="module")
def checkpoint(tiny_run):
    """conftest's shared run (resnet34 at 32 px)."""
    return tiny_run[0] / "best.pt"


# The sizes draw_confusion_matrix and draw_mistakes promise, from their defaults.
def confusion_matrix_size(classes, cell=80, font_size=16):
    pad, line = 12, round(1.5 * font_size)
    name = math.ceil(0.6 * font_size * max(4, *map(len, classes)))
    cell = max(cell, name + 8)
    note = math.ceil(0.6 * round(0.8 * font_size) * len("colour and %: share of the true class (row)"))
    return max(pad + name + pad + len(classes) * cell, pad + note) + pad, pad + 3 * line + len(classes) * cell + pad


def mistakes_size(shown, tile=128, font_size=14):
    gap, line = 8, round(1.3 * font_size)
    cols = min(8, max(4, shown))
    rows = max(1, math.ceil(shown / cols))
    return gap + cols * (tile + gap), gap + line + gap + rows * (tile + 2 * line + gap)


def test_test_save_dir_writes_metrics_and_pictures(checkpoint, tiny_data, tmp_path):
    code, _, err = main_in_process("fer.py", "test", "--checkpoint", checkpoint, "--data", tiny_data,
                                   "--save-dir", tmp_path / "out", "--tta", "flip", "--mistakes", "5", *THREADS)
    assert code == 0, err
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["classes"] == list(CLASSES) and m["tta"] == "flip"
    cm = torch.tensor(m["confusion_matrix"])
    assert cm.sum() == 12  # tiny_data: 4 test images a class
    with Image.open(tmp_path / "out" / "confusion_matrix.png") as img:
        assert img.size == confusion_matrix_size(CLASSES)
    with Image.open(tmp_path / "out" / "mistakes.png") as img:
        assert img.size == mistakes_size(min(5, int(cm.sum() - cm.trace())))


def test_confusion_matrix_column_names_fit():
    cm = torch.arange(49).view(7, 7)
    assert pictures.draw_confusion_matrix(cm, FER7).size == confusion_matrix_size(FER7)
    cell = max(80, math.ceil(0.6 * 16 * max(map(len, FER7))) + 8)
    font = ImageFont.load_default(size=16)  # the font the names are drawn in
    assert all(font.getlength(name) <= cell - 8 for name in FER7)  # a gap between neighbours


def test_mistakes_most_confident_first():
    # Six images, each a flat grey that identifies it; 0 and 3 are right.
    greys = [10, 50, 90, 130, 170, 210]
    images = torch.tensor(greys, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 1, 32, 32)
    faces = fer.Faces(images, torch.tensor([0, 0, 1, 1, 2, 2]), list(CLASSES), [""] * 6)
    conf = torch.tensor([0.9, 0.6, 0.5, 0.9, 0.95, 0.7])
    pred = torch.tensor([0, 1, 0, 1, 0, 0])
    probs = torch.full((6, 3), 0.0).scatter(1, pred[:, None], conf[:, None])
    probs += (1 - conf[:, None]) / 2 * (probs == 0)  # the rest shared by the other two
    img = pictures.draw_mistakes(faces, probs, limit=3)
    assert img.size == mistakes_size(3)
    # tile k's centre: gap + k (tile + gap) + tile / 2 across, header + gap + tile / 2 down
    centres = [img.getpixel((8 + k * 136 + 64, 8 + 18 + 8 + 64)) for k in range(3)]
    assert centres == [(g, g, g) for g in (170, 210, 50)]  # confidences 0.95, 0.7, 0.6; 0.5 left out


def test_prediction_cards_three_a_row():
    """predict's picture: one card per face, three a row, each as wide as the longest
    class name needs; the predicted class's bar in red."""
    images = torch.full((4, 3, 32, 32), 128, dtype=torch.uint8)
    results = [dict(file=f"face{k}.png", prediction="happy", probabilities={"angry": 0.1, "happy": 0.7, "sad": 0.2})
               for k in range(4)]
    img = pictures.draw_predictions(images, results, list(CLASSES))
    line, gap, tile = round(1.4 * 13), 10, 112
    card_w, card_h = tile + gap + math.ceil(0.6 * 13 * 5) + 120, max(tile, line * 4)
    assert img.size == (gap + 3 * (card_w + gap), gap + 2 * (card_h + gap))
    bar_x, bar_y = gap + tile + gap + math.ceil(0.6 * 13 * 5) + 4 + 2, gap + 2 * line + line // 2  # happy's bar
    assert img.getpixel((bar_x, bar_y)) == (178, 34, 34)  # firebrick


def test_faces_are_boxed_on_a_copy_of_the_photo():
    photo = Image.new("RGB", (320, 200), (90, 120, 150))
    results = [dict(box=(100, 80, 60, 60), prediction="happy", probabilities={"happy": 0.9})]
    img = pictures.draw_faces(photo, results)
    assert img.size == photo.size and photo.getpixel((100, 110)) == (90, 120, 150)  # the photo itself untouched
    assert img.getpixel((100, 110)) == (178, 34, 34)  # the box's left edge, in firebrick
    assert img.getpixel((130, 110)) == (90, 120, 150)  # the face inside it is not painted over


@pytest.mark.parametrize("watched", [False, True])
def test_curves_add_a_panel_for_the_watched_test_split(watched):
    history = [dict(epoch=e, loss=1 / e, val_accuracy=0.5 + e / 10, val_macro_f1=0.4 + e / 10,
                    **(dict(test_accuracy=0.5, test_macro_f1=0.4) if watched else {})) for e in (1, 2, 3)]
    img = pictures.draw_curves(history, best_epoch=3)
    assert img.size == ((1440 if watched else 960), 360)
    assert len(img.getcolors(1 << 16)) > 10  # lines drawn, not a blank canvas


def test_save_png_is_atomic_and_names_the_option(tmp_path):
    path = tmp_path / "curves.png"
    pictures.save_png(Image.new("RGB", (4, 4), "red"), path, "--out")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.getpixel((0, 0)) == (255, 0, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]  # no temporary file left
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder\n")
    with pytest.raises(fer.FerError, match=f"cannot write {blocker / 'x.png'} .*; free disk space or choose another --save-dir"):
        pictures.save_png(Image.new("RGB", (4, 4)), blocker / "x.png", "--save-dir")
