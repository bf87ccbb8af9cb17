"""predict.py: class probabilities of image files, folders and faces in photos; its
--checkpoint (one file per use, repeated for an ensemble; the shipped model without
it); its table, JSON and pictures.

One tiny checkpoint, trained in this process (conftest's `tiny_run`); predict.py
runs in this process and, for its table and JSON, also in a subprocess as a user
runs it (marked slow: starting Python and torch costs seconds).
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import predict
from conftest import CLASSES, ROOT, assert_error, main_in_process

# The shared CPU also runs a long training: one thread each, or intra-op threads
# spinning against it made a one-epoch run 30x slower.
THREADS = ("--threads", "1")


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


def test_predict_table_and_json(checkpoint, images, tmp_path, cli):
    files, folder, in_folder = images
    out = tmp_path / "predictions.json"
    # in_folder[1] is also named on its own: one row all the same
    # --no-detect: wide.png and large.jpg are not face crops, which OpenCV, when installed, would search
    code, stdout, err = cli("predict.py", *files, folder, in_folder[1], "--checkpoint", checkpoint,
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
    code, _, err = main_in_process("predict.py", images[0][0], "--checkpoint", checkpoint, "--tta", "tencrop",
                                   "--top", "10", "--json", out, *THREADS)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["tta"] == "tencrop"
    assert [len(p["top"]) for p in result["predictions"]] == [len(CLASSES)]


def test_find_images(tmp_path, images):
    _, folder, in_folder = images
    assert predict.find_images([folder, in_folder[0]]) == in_folder
    (tmp_path / "empty").mkdir()
    for path, message in ((tmp_path / "empty", "has no images"), (tmp_path / "missing.jpg", "does not exist"),
                          (tmp_path / "b.pt", "is a checkpoint, not a picture; repeat --checkpoint")):
        with pytest.raises(predict.FerError, match=message):
            predict.find_images([path])


# ----------------------------------------------------------------------------
# --checkpoint: one file per use; repeated, an ensemble; without it, the shipped model

def predict_json(call_main, tmp_path, *args):
    """predict.py ARGS --json: its exit status and JSON."""
    code, _, err = call_main("predict.py", *args, "--json", tmp_path / "p.json", *THREADS)
    assert code == 0, err
    return json.loads((tmp_path / "p.json").read_text())


def test_checkpoint_before_the_paths_is_used_alone(tiny_run, tiny_data, tmp_path, call_main):
    """`--checkpoint CKPT PATH`: CKPT alone (not the shipped model beside it), and PATH
    is an image to classify, not a second checkpoint."""
    ckpt, face = tiny_run[0] / "best.pt", tiny_data / "test" / "sad" / "000.jpg"
    result = predict_json(call_main, tmp_path, "--checkpoint", ckpt, face)
    assert [m["checkpoint"] for m in result["members"]] == [str(ckpt)]
    assert result["arch"] == "resnet34" and result["classes"] == list(CLASSES)
    assert [p["file"] for p in result["predictions"]] == [str(face)]


def test_repeated_checkpoint_is_an_ensemble(tiny_run, tiny_data, tmp_path, call_main):
    a, b = tiny_run[0] / "best.pt", tiny_run[0] / "last.pt"  # two checkpoints of the same classes
    face = tiny_data / "test" / "sad" / "000.jpg"
    result = predict_json(call_main, tmp_path, face, "--checkpoint", a, "--checkpoint", b)
    assert result["arch"] == "ensemble"
    assert [m["checkpoint"] for m in result["members"]] == [str(a), str(b)]
    assert [p["file"] for p in result["predictions"]] == [str(face)]


def test_pictures_may_stand_on_both_sides_of_the_options(tiny_run, tiny_data, tmp_path, call_main):
    faces = [tiny_data / "test" / c / "000.jpg" for c in ("sad", "happy")]
    result = predict_json(call_main, tmp_path, faces[0], "--checkpoint", tiny_run[0] / "best.pt", faces[1])
    assert [p["file"] for p in result["predictions"]] == [str(f) for f in faces]
    assert [m["checkpoint"] for m in result["members"]] == [str(tiny_run[0] / "best.pt")]


@pytest.mark.parametrize("order", ["checkpoints first", "paths first"])
def test_a_checkpoint_among_the_paths_says_to_repeat_checkpoint(order, tiny_run, tiny_data, call_main):
    """The old `--checkpoint a.pt b.pt`, either side of the images: one line that says to
    repeat --checkpoint, before any checkpoint is read."""
    a, b = tiny_run[0] / "best.pt", tiny_run[0] / "last.pt"
    face = tiny_data / "test" / "sad" / "000.jpg"
    if order == "checkpoints first":  # b.pt lands among the PATHs
        code, out, err = call_main("predict.py", "--checkpoint", a, b, face, *THREADS)
    else:  # pictures stand on both sides of the options: b.pt is taken for one too
        code, out, err = call_main("predict.py", face, "--checkpoint", a, b, *THREADS)
    needles = (f"{b} is a checkpoint, not a picture", "repeat --checkpoint", f"--checkpoint a.pt --checkpoint {b}")
    assert_error(code, err, *needles, prog="predict.py")
    assert out == ""


def test_the_default_checkpoint_is_the_shipped_five_class_model():
    assert predict.DEFAULT_CHECKPOINT == ROOT / "checkpoints" / "googlenet_fer2013-5class_64.pt"
    assert predict.DEFAULT_CHECKPOINT.is_file()
    assert predict.build_parser().parse_args(["face.png"]).checkpoint is None  # main fills in the default


def test_predict_refuses_another_normalisation(checkpoint, images, tmp_path, capsys):
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["mean"] = 0.45
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(SystemExit) as e:
        predict.main([str(images[0][0]), "--checkpoint", str(tmp_path / "other.pt"), *THREADS])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "normalises with 0.5" in err and err.startswith("predict.py: error: "), err


def test_predict_samples_with_the_shipped_checkpoint_and_its_picture(tmp_path, call_main):
    """The README's first command: no --checkpoint, the shipped five-class network;
    one row per sample face, and predictions.png with --save-dir."""
    code, out, err = call_main("predict.py", ROOT / "samples", "--save-dir", tmp_path, "--json", tmp_path / "p.json",
                              "--threads", "1")
    assert code == 0, err
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["arch"] == "googlenet" and res["classes"] == ["angry", "happy", "neutral", "sad", "surprise"]
    assert [m["checkpoint"] for m in res["members"]] == [str(predict.DEFAULT_CHECKPOINT)]
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


def test_detect_two_faces_rows_boxes_json_and_picture(tmp_path, call_main):
    """The issue's done-when: two faces in a photo, two rows with boxes, the
    boxes in the JSON, and the photo written with the boxes drawn on it."""
    pytest.importorskip("cv2")
    squares = compose_photo(tmp_path / "photo.png", TWO_FACES)
    code, out, err = call_main("predict.py", "--detect", tmp_path / "photo.png", "--save-dir", tmp_path / "out",
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


def test_detect_by_default_on_photos_only_and_says_when_none_is_found(tmp_path, call_main):
    """Without --detect, OpenCV searches pictures that are not face crops; a face
    crop is classified whole (box -), and a photo without a face is not classified
    (alone, it is an error: tests/test_errors.py, case 11)."""
    pytest.importorskip("cv2")
    compose_photo(tmp_path / "photo.png", TWO_FACES[:1])
    compose_photo(tmp_path / "empty.png", [])
    crop = ROOT / "samples" / "happy_1.png"
    code, out, err = call_main("predict.py", tmp_path / "photo.png", crop, tmp_path / "empty.png", *THREADS)
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


def test_without_opencv_a_photo_is_classified_whole_with_a_note(no_opencv, checkpoint, images, tmp_path, call_main):
    compose_photo(tmp_path / "photo.png", TWO_FACES)
    crop = images[0][0]  # 48x48: a face crop, classified whole without a note
    code, out, err = call_main("predict.py", tmp_path / "photo.png", crop, "--checkpoint", checkpoint,
                              "--json", tmp_path / "p.json", *THREADS)
    assert code == 0
    assert err.splitlines() == [f"note: {tmp_path / 'photo.png'} is 640x360, not a face crop: the network "
                                "expects a cropped face, as in FER2013; pip install \"opencv-python-headless<5\" "
                                "to find the faces first"]
    assert out.splitlines()[0].split()[:2] == ["file", "predicted"]  # no box column
    preds = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert [(p["file"], p["box"]) for p in preds] == [(str(tmp_path / "photo.png"), None), (str(crop), None)]
    code, _, err = call_main("predict.py", tmp_path / "photo.png", "--checkpoint", checkpoint, "--no-detect", *THREADS)
    assert code == 0 and err == ""  # asked for: no note


def test_crop_face_is_a_grayscale_square_padded_at_the_edge(monkeypatch):
    monkeypatch.setattr(predict, "FACE_MARGIN", 2)  # a wide margin, so that the padding shows
    photo = Image.new("RGB", (100, 80), (200, 40, 40))
    face = predict.crop_face(photo, (0, 0, 40, 40), 32, 3)  # the square (-20, -20)-(60, 60): black beyond the edge
    assert face.shape == (3, 32, 32) and face.dtype == torch.uint8
    assert torch.equal(face[0], face[1]) and torch.equal(face[1], face[2])  # grayscale, as FER2013
    assert face[0, 0, 0] == 0 and face[0, 24, 24] == round(0.299 * 200 + 0.587 * 40 + 0.114 * 40)
    assert predict.crop_face(photo, (10, 10, 40, 40), 48, 1).shape == (1, 48, 48)


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
    predict.save_photos(tmp_path / "out", results)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x_2_2_faces.png", "x_2_faces.png", "x_faces.png"]
