"""Using a trained model: `predict`, test-time augmentation and `test --save-dir`'s pictures.

One tiny checkpoint, trained in this process (conftest's `tiny_run`); the CLI runs
in this process and, for `predict`'s table and JSON, also in a subprocess as a user
runs it (marked slow: starting Python and torch costs seconds); TTA and the drawing
functions are checked in-process.
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFont

import fer
import nets
from conftest import CLASSES, ROOT, main_in_process

# The shared CPU also runs a long training: one thread each, or intra-op threads
# spinning against it made a one-epoch run 30x slower.
THREADS = ("--threads", "1")
FER7 = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tiny_run):
    """conftest's shared run (resnet34 at 32 px, --no-amp: bfloat16 autocast on CPU
    blew 4-image batches up to NaN weights, which is not what is tested here)."""
    return tiny_run[0] / "best.pt"


def noise(mode, size, seed=0):
    """A random image of `size` (width, height) in `mode`, made without numpy."""
    g = torch.Generator().manual_seed(seed)
    w, h = size
    rgb = Image.frombytes("RGB", size, bytes(torch.randint(0, 256, (h * w * 3,), generator=g).tolist()))
    if mode == "RGBA":  # alpha from transparent to opaque, left to right
        rgb.putalpha(Image.linear_gradient("L").rotate(90).resize(size))
        return rgb
    if mode == "P":  # a palette with one transparent entry, as GIFs and PNG-8s have
        img = rgb.convert("P")
        img.info["transparency"] = 0
        return img
    return rgb.convert(mode)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Files to name one by one (each mode, a non-square and a large one) and a folder."""
    root = tmp_path_factory.mktemp("images")
    files = {"gray.png": noise("L", (48, 48)), "rgb.jpg": noise("RGB", (48, 48)),
             "rgba.png": noise("RGBA", (48, 48)), "palette.png": noise("P", (48, 48)),
             "wide.png": noise("RGB", (120, 40)), "large.jpg": noise("RGB", (1600, 1200))}
    for name, img in files.items():
        img.save(root / name)
    folder = root / "folder"
    (folder / "sub").mkdir(parents=True)
    noise("LA", (64, 48)).save(folder / "la.png")
    noise("1", (40, 60)).save(folder / "sub" / "bw.bmp")
    (folder / "notes.txt").write_text("not an image")
    (folder / "._face.jpg").write_bytes(b"macOS metadata, not a JPEG")  # hidden: skipped
    return [root / name for name in files], folder, [folder / "la.png", folder / "sub" / "bw.bmp"]


def test_predict_table_and_json(checkpoint, images, tmp_path, fer_cli):
    files, folder, in_folder = images
    out = tmp_path / "predictions.json"
    # in_folder[1] is also named on its own: one row all the same
    # --no-detect: wide.png and large.jpg are not face crops, which OpenCV, when installed, would search
    code, stdout, err = fer_cli("predict", *files, folder, in_folder[1], "--checkpoint", checkpoint,
                                "--json", out, "--top", "2", "--no-detect", *THREADS)
    assert code == 0, err
    header, *rows = stdout.splitlines()
    expected = [str(f) for f in files + in_folder]
    assert header.split() == ["file", "predicted", *CLASSES]
    assert [row.split()[0] for row in rows] == expected
    assert len({len(line) for line in [header, *rows]}) == 1  # aligned columns
    for row in rows:
        _, predicted, *probs = row.split()
        assert predicted in CLASSES and sum(map(float, probs)) == pytest.approx(1, abs=2e-3)

    result = json.loads(out.read_text())
    assert result["classes"] == list(CLASSES) and result["tta"] == "none"
    assert [p["file"] for p in result["predictions"]] == expected
    for p, row in zip(result["predictions"], rows):
        probs = p["probabilities"]
        assert list(probs) == list(CLASSES)
        assert sum(probs.values()) == pytest.approx(1, abs=1e-3)
        assert len(p["top"]) == 2
        assert p["top"][0]["probability"] >= p["top"][1]["probability"]
        assert all(probs[t["label"]] == t["probability"] for t in p["top"])
        assert p["prediction"] == p["top"][0]["label"] == max(probs, key=probs.get) == row.split()[1]


def test_predict_tencrop_and_top_above_classes(checkpoint, images, tmp_path):
    out = tmp_path / "p.json"
    code, _, err = main_in_process("predict", images[0][0], "--checkpoint", checkpoint, "--tta", "tencrop",
                                   "--top", "10", "--json", out, *THREADS)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["tta"] == "tencrop"
    assert [len(p["top"]) for p in result["predictions"]] == [len(CLASSES)]


def test_find_images(tmp_path, images):
    _, folder, in_folder = images
    assert fer.find_images([folder, in_folder[0]]) == in_folder
    (tmp_path / "empty").mkdir()
    for path, message in ((tmp_path / "empty", "has no images"), (tmp_path / "missing.jpg", "does not exist")):
        with pytest.raises(fer.FerError, match=message):
            fer.find_images([path])


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
    rt = fer.Runtime(torch.device("cpu"))  # float32: the comparison is exact
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
    code, _, err = main_in_process("test", "--checkpoint", checkpoint, "--data", tiny_data,
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
    assert fer.draw_confusion_matrix(cm, FER7).size == confusion_matrix_size(FER7)
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
    img = fer.draw_mistakes(faces, probs, limit=3)
    assert img.size == mistakes_size(3)
    # tile k's centre: gap + k (tile + gap) + tile / 2 across, header + gap + tile / 2 down
    centres = [img.getpixel((8 + k * 136 + 64, 8 + 18 + 8 + 64)) for k in range(3)]
    assert centres == [(g, g, g) for g in (170, 210, 50)]  # confidences 0.95, 0.7, 0.6; 0.5 left out


def test_predict_refuses_another_normalisation(checkpoint, images, tmp_path, capsys):
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["mean"] = 0.45
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(SystemExit) as e:
        fer.main(["predict", str(images[0][0]), "--checkpoint", str(tmp_path / "other.pt"), *THREADS])
    assert e.value.code == 2 and "normalises with 0.5" in capsys.readouterr().err


def test_predict_samples_with_the_shipped_checkpoint_and_its_picture(tmp_path, fer_main):
    """The README's first command: no --checkpoint, the shipped five-class network;
    one row per sample face, and predictions.png with --save-dir."""
    code, out, err = fer_main("predict", ROOT / "samples", "--save-dir", tmp_path, "--json", tmp_path / "p.json",
                              "--threads", "1")
    assert code == 0, err
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["arch"] == "googlenet" and res["classes"] == ["angry", "happy", "neutral", "sad", "surprise"]
    names = sorted(Path(r["file"]).name for r in res["predictions"])
    assert len(names) == 15 and names[0] == "angry_1.png" and "README.md" not in names
    assert sum(Path(r["file"]).name.split("_")[0] == r["prediction"] for r in res["predictions"]) >= 8
    with Image.open(tmp_path / "predictions.png") as img:
        assert img.size[0] > 3 * 112 and img.size[1] > 5 * 112  # 3 cards a row, 5 rows


# ----------------------------------------------------------------------------
# Faces in photos: OpenCV's detector, an optional extra

def compose_photo(path, faces, size=(640, 360), side=160):
    """A 'photo': sample faces scaled to `side` px, pasted at (x, y) on a flat
    background. Returns the pasted squares as (left, top, width, height)."""
    photo = Image.new("RGB", size, (90, 120, 150))
    for name, xy in faces:
        with Image.open(ROOT / "samples" / f"{name}.png") as face:
            photo.paste(face.convert("RGB").resize((side, side), Image.BICUBIC), xy)
    photo.save(path)
    return [(x, y, side, side) for _, (x, y) in faces]


def iou(a, b):
    w = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)


# Two faces that the alt cascade finds at 160 px, and that the shipped network reads right.
TWO_FACES = [("happy_1", (60, 100)), ("neutral_2", (380, 100))]


def test_detect_two_faces_rows_boxes_json_and_picture(tmp_path, fer_main):
    """The issue's done-when: two faces in a photo, two rows with boxes, the
    boxes in the JSON, and the photo written with the boxes drawn on it."""
    pytest.importorskip("cv2")
    squares = compose_photo(tmp_path / "photo.png", TWO_FACES)
    code, out, err = fer_main("predict", "--detect", tmp_path / "photo.png", "--save-dir", tmp_path / "out",
                              "--json", tmp_path / "p.json", *THREADS)
    assert code == 0 and err == "", err
    header, *rows = out.splitlines()[:3]
    assert header.split()[:3] == ["file", "box", "predicted"]
    preds = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert [p["prediction"] for p in preds] == ["happy", "neutral"]  # left to right
    for p, row, square in zip(preds, rows, squares):
        assert iou(p["box"], square) > 0.5
        assert row.split()[:3] == [str(tmp_path / "photo.png"), ",".join(map(str, p["box"])), p["prediction"]]
    with Image.open(tmp_path / "out" / "photo_faces.png") as img:
        assert img.size == (640, 360)
        x, y, w, h = preds[0]["box"]
        assert img.getpixel((x, y + h // 2)) == (178, 34, 34)  # the box's left edge, in firebrick
    assert (tmp_path / "out" / "predictions.png").is_file()  # the faces as the network saw them


def test_detect_by_default_on_photos_only_and_says_when_none_is_found(tmp_path, fer_main):
    """Without --detect, OpenCV searches pictures that are not face crops; a face
    crop is classified whole (box -), and a photo without a face is not classified
    (alone, it is an error: tests/test_errors.py, case 11)."""
    pytest.importorskip("cv2")
    compose_photo(tmp_path / "photo.png", TWO_FACES[:1])
    compose_photo(tmp_path / "empty.png", [])
    crop = ROOT / "samples" / "happy_1.png"
    code, out, err = fer_main("predict", tmp_path / "photo.png", crop, tmp_path / "empty.png", *THREADS)
    assert code == 0, err
    rows = [row.split() for row in out.splitlines()[1:]]
    assert [row[0] for row in rows] == [str(tmp_path / "photo.png"), str(crop)]
    assert rows[0][1] != "-" and rows[1][1] == "-"
    assert err.splitlines() == [f"note: no face found in {tmp_path / 'empty.png'}, so it is not classified; "
                                "give photos of frontal faces, or pass --no-detect to classify whole pictures"]


@pytest.fixture
def no_opencv(monkeypatch):
    """As if OpenCV were not installed, whether or not it is: `import cv2` fails."""
    monkeypatch.setitem(sys.modules, "cv2", None)


def test_without_opencv_a_photo_is_classified_whole_with_a_note(no_opencv, checkpoint, images, tmp_path, fer_main):
    compose_photo(tmp_path / "photo.png", TWO_FACES)
    crop = images[0][0]  # 48x48: a face crop, classified whole without a note
    code, out, err = fer_main("predict", tmp_path / "photo.png", crop, "--checkpoint", checkpoint,
                              "--json", tmp_path / "p.json", *THREADS)
    assert code == 0
    assert err.splitlines() == [f"note: {tmp_path / 'photo.png'} is 640x360, not a face crop: the network "
                                "expects a cropped face, as in FER2013; pip install \"opencv-python-headless<5\" "
                                "to find the faces first"]
    assert out.splitlines()[0].split()[:2] == ["file", "predicted"]  # no box column
    preds = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert [(p["file"], p["box"]) for p in preds] == [(str(tmp_path / "photo.png"), None), (str(crop), None)]
    code, _, err = fer_main("predict", tmp_path / "photo.png", "--checkpoint", checkpoint, "--no-detect", *THREADS)
    assert code == 0 and err == ""  # asked for: no note


def test_crop_face_is_a_grayscale_square_padded_at_the_edge(monkeypatch):
    monkeypatch.setattr(fer, "FACE_MARGIN", 2)  # a wide margin, so that the padding shows
    photo = Image.new("RGB", (100, 80), (200, 40, 40))
    face = fer.crop_face(photo, (0, 0, 40, 40), 32, 3)  # the square (-20, -20)-(60, 60): black beyond the edge
    assert face.shape == (3, 32, 32) and face.dtype == torch.uint8
    assert torch.equal(face[0], face[1]) and torch.equal(face[1], face[2])  # grayscale, as FER2013
    assert face[0, 0, 0] == 0 and face[0, 24, 24] == round(0.299 * 200 + 0.587 * 40 + 0.114 * 40)
    assert fer.crop_face(photo, (10, 10, 40, 40), 48, 1).shape == (1, 48, 48)


def test_annotated_photos_of_the_same_name_do_not_overwrite_each_other(tmp_path):
    """a/x.png, b/x.png and c/x_2.png each get their own annotated picture."""
    files = []
    for folder, stem in (("a", "x"), ("b", "x"), ("c", "x_2")):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (64, 64), (40, 80, 120)).save(tmp_path / folder / f"{stem}.png")
        files.append(str(tmp_path / folder / f"{stem}.png"))
    results = [dict(file=f, box=(8, 8, 32, 32), prediction="happy", probabilities={"happy": 0.9})
               for f in files]
    (tmp_path / "out").mkdir()
    fer.save_photos(tmp_path / "out", results)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x_2_2_faces.png", "x_2_faces.png", "x_faces.png"]


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
