"""prepare.py: every public form of FER2013 -> fer5/ and fer2013/, and bad downloads refused.

A tiny FER2013 is written here in each form (Kaggle's CSV, the ICML CSV, the
image-folder copy, their archives), with a tiny manifest that picks fer5's faces
from it, as data/fer5_manifest.csv does from the real one.
"""
import csv
import hashlib
import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

import prepare as prepare_py
from conftest import ENV, ROOT, assert_error, run_script

CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # the CSV's codes 0-6
FER5 = ("angry", "happy", "neutral", "sad", "surprise")
USAGES = ("Training", "Training", "PublicTest", "PrivateTest")  # per class, in row order
SHARED = ROOT.parent / "shared" / "data"


def pixels_of(row):
    return bytes((row * 37 + i * 11) % 256 for i in range(48 * 48))


def jpeg(pixels):
    buf = io.BytesIO()
    Image.frombytes("L", (48, 48), pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def fer2013(tmp_path_factory):
    """The tiny FER2013 in every form, and its manifest."""
    root = tmp_path_factory.mktemp("fer2013")
    rows = [(c, usage) for c in range(len(CLASSES)) for usage in USAGES]  # 28 faces
    with open(root / "fer2013.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["emotion", "pixels", "Usage"])
        for r, (c, usage) in enumerate(rows):
            w.writerow([c, " ".join(map(str, pixels_of(r))), usage])
    with open(root / "icml_face_data.csv", "w", newline="") as f:  # the ICML column order and spaces
        w = csv.writer(f)
        w.writerow(["emotion", " Usage", " pixels"])
        for r, (c, usage) in enumerate(rows):
            w.writerow([c, usage, " ".join(map(str, pixels_of(r)))])
    folder = root / "images"
    manifest = []
    for r, (c, usage) in enumerate(rows):
        split = "train" if usage == "Training" else "test"
        name = f"{usage}_{1000 + r}.jpg"
        data = jpeg(pixels_of(r))
        (folder / split / CLASSES[c]).mkdir(parents=True, exist_ok=True)
        (folder / split / CLASSES[c] / name).write_bytes(data)
        if CLASSES[c] in FER5 and r % 4 in (0, 3):  # a class's first Training face and its PrivateTest face
            manifest.append(dict(split=split, **{"class": CLASSES[c]}, file=name,
                                 sha256=hashlib.sha256(data).hexdigest(),
                                 fer2013_row="" if r == 0 else r))  # as for 31 real faces: no known row
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["split", "class", "file", "sha256", "fer2013_row"])
        w.writeheader()
        w.writerows(manifest)
    return root, rows, manifest


def prepare(call_main, src, out, manifest):
    """prepare.py SRC --out OUT --manifest MANIFEST, in this process."""
    return call_main("prepare.py", src, "--out", out, "--manifest", manifest)


def files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_csv_writes_both_folders_losslessly(fer2013, tmp_path, call_main):
    root, rows, manifest = fer2013
    code, out, err = prepare(call_main, root / "fer2013.csv", tmp_path, root / "manifest.csv")
    assert code == 0, err
    # every fer5 face with a known row, as PNG with exactly the row's pixels
    known = [m for m in manifest if m["fer2013_row"] != ""]
    assert files(tmp_path / "fer5") == sorted(f"{m['split']}/{m['class']}/{Path(m['file']).stem}.png" for m in known)
    for m in known:
        with Image.open(tmp_path / "fer5" / m["split"] / m["class"] / f"{Path(m['file']).stem}.png") as img:
            assert img.mode == "L" and img.tobytes() == pixels_of(int(m["fer2013_row"]))
    # fer2013: every row, in its Usage's folder
    want = sorted(f"{ {'Training': 'train', 'PrivateTest': 'test', 'PublicTest': 'publictest'}[u]}/"
                  f"{CLASSES[c]}/row_{r:05d}.png" for r, (c, u) in enumerate(rows))
    assert files(tmp_path / "fer2013") == want
    assert "left out: 1 fer5 faces whose fer2013.csv row is unknown" in out
    assert f"{tmp_path / 'fer5' / 'train'}:" in out and "publictest holds FER2013's PublicTest" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fer2013", "fer5"]  # no temporary folder left


def test_icml_csv_gives_the_same_faces(fer2013, tmp_path, call_main):
    root, _, _ = fer2013
    for name in ("fer2013.csv", "icml_face_data.csv"):
        assert prepare(call_main, root / name, tmp_path / name, root / "manifest.csv")[0] == 0
    a, b = tmp_path / "fer2013.csv", tmp_path / "icml_face_data.csv"
    assert files(a) == files(b)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files(a))


def test_image_folders_copy_fer5_byte_for_byte(fer2013, tmp_path, call_main):
    root, _, manifest = fer2013
    code, out, err = prepare(call_main, root / "images", tmp_path, root / "manifest.csv")
    assert code == 0, err
    assert files(tmp_path / "fer5") == sorted(f"{m['split']}/{m['class']}/{m['file']}" for m in manifest)
    for m in manifest:
        src = root / "images" / m["split"] / m["class"] / m["file"]
        assert (tmp_path / "fer5" / m["split"] / m["class"] / m["file"]).read_bytes() == src.read_bytes()
    # test/ mixes PublicTest and PrivateTest: told apart by the file name
    assert {p.split("/")[0] for p in files(tmp_path / "fer2013")} == {"train", "test", "publictest"}
    assert all(Path(p).name.startswith("PublicTest_") for p in files(tmp_path / "fer2013" / "publictest"))
    assert all(Path(p).name.startswith("PrivateTest_") for p in files(tmp_path / "fer2013" / "test"))
    assert "left out" not in out


def zip_of(folder, path, prefix=""):
    with zipfile.ZipFile(path, "w") as z:
        for f in files(folder):
            z.write(folder / f, prefix + f)
    return path


def test_archives_are_read_in_place(fer2013, tmp_path, call_main):
    """A zip of the image folders (with a top folder), a .tar.gz of the CSV, and Kaggle's
    zip that holds fer2013.tar.gz: the same faces as from the unpacked forms, and
    nothing unpacked beside the archive."""
    root, _, _ = fer2013
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    archive = zip_of(root / "images", downloads / "archive.zip", prefix="fer2013/")
    tgz = downloads / "fer2013.tar.gz"
    with tarfile.open(tgz, "w:gz") as t:
        t.add(root / "fer2013.csv", "fer2013/fer2013.csv")
    kaggle = downloads / "challenge.zip"
    with zipfile.ZipFile(kaggle, "w") as z:
        z.write(tgz, "fer2013.tar.gz")
        z.writestr("example_submission.csv", "id,emotion\n")
    expected = {}
    for src, name in ((root / "images", "images"), (root / "fer2013.csv", "csv")):
        assert prepare(call_main, src, tmp_path / name, root / "manifest.csv")[0] == 0
        expected[name] = tmp_path / name
    for src, like in ((archive, "images"), (tgz, "csv"), (kaggle, "csv")):
        out = tmp_path / src.name
        code, _, err = prepare(call_main, src, out, root / "manifest.csv")
        assert code == 0, err
        assert files(out) == files(expected[like])
        assert all((out / f).read_bytes() == (expected[like] / f).read_bytes() for f in files(out))
    assert sorted(p.name for p in downloads.iterdir()) == ["archive.zip", "challenge.zip", "fer2013.tar.gz"]


def csv_with(root, tmp_path, edit):
    """The tiny fer2013.csv with `edit(lines)` applied to its lines."""
    lines = (root / "fer2013.csv").read_text().splitlines(keepends=True)
    path = tmp_path / "fer2013.csv"
    path.write_text("".join(edit(lines)))
    return path


def set_field(lines, row, col, value):
    fields = next(csv.reader([lines[row + 1]]))
    fields[col] = value
    buf = io.StringIO()
    csv.writer(buf).writerow(fields)
    return lines[:row + 1] + [buf.getvalue()] + lines[row + 2:]


BAD_CSVS = {
    "header": (lambda l: ["emotion,pixels\n"] + l[1:], ["has the columns emotion,pixels", "Usage"]),
    "fields": (lambda l: l[:3] + ["3,1 2 3\n"] + l[4:], ["data row 2 (line 4) has 2 fields, not 3"]),
    "pixel count": (lambda l: set_field(l, 5, 1, "1 2 3"), ["data row 5", "has 3 pixels, not 48x48"]),
    "not a number": (lambda l: set_field(l, 6, 1, " ".join(["7"] * 2303 + ["x"])), ["data row 6", "not numbers 0-255"]),
    "above 255": (lambda l: set_field(l, 6, 1, " ".join(["7"] * 2303 + ["256"])), ["data row 6", "not numbers 0-255"]),
    "emotion": (lambda l: set_field(l, 4, 0, "7"), ["data row 4", "emotion '7' is not a code 0-6"]),
    "usage": (lambda l: set_field(l, 3, 2, "Validation"), ["data row 3", "Usage 'Validation'"]),
    "empty": (lambda l: [], ["is empty"]),
    "cut in a row": (lambda l: l[:10] + [l[10][:500]], ["data row 9", "has 2 fields, not 3"]),
    "cut between rows": (lambda l: l[:10], ["has 9 data rows", "is missing", "truncated"]),
    "other labels": (lambda l: set_field(l, 27, 0, "5"), ["data row 27 is surprise (test)", "neutral (test)",
                                                          "not the original FER2013 CSV"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CSVS))
def test_bad_csv_is_refused_in_one_line(case, fer2013, tmp_path, call_main):
    root, _, _ = fer2013
    edit, needles = BAD_CSVS[case]
    src = csv_with(root, tmp_path, edit)
    out = tmp_path / "data"
    code, _, err = prepare(call_main, src, out, root / "manifest.csv")
    assert code == 2 and err.count("\n") == 1 and err.startswith("prepare.py: error: "), err
    assert str(src) in err and all(n in err for n in needles), err
    assert not out.exists() or list(out.iterdir()) == []  # nothing half-written, no temporary folder


def damaged_copy(root, tmp_path, what):
    folder = tmp_path / "images"
    shutil.copytree(root / "images", folder)
    face = folder / "test" / "sad" / f"PrivateTest_{1000 + 4 * 4 + 3}.jpg"  # a fer5 test face
    if what == "missing":
        face.unlink()
    elif what == "bytes":
        with Image.open(face) as img:  # the same face, encoded again: a valid JPEG with other bytes
            img.save(face, format="JPEG", quality=70)
    elif what == "corrupt":
        (folder / "train" / "fear" / "Training_1009.jpg").write_bytes(b"not a jpeg")
    elif what == "no prefix":
        (folder / "test" / "fear" / "face.jpg").write_bytes(face.read_bytes())
    elif what == "neither":
        shutil.rmtree(folder / "test")
    return folder


BAD_FOLDERS = {
    "missing": ["fer5's face test/sad/PrivateTest_1019.jpg is not in the source", "1 of the manifest's"],
    "bytes": ["PrivateTest_1019.jpg is fer5's face", "bytes differ", "SHA-256"],
    "corrupt": ["cannot read image", "Training_1009.jpg", "download it again"],
    "no prefix": ["face.jpg: cannot tell its FER2013 split"],
    "neither": ["holds neither fer2013.csv / icml_face_data.csv nor the image-folder copy"],
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_image_folders_are_refused_in_one_line(case, fer2013, tmp_path, call_main):
    root, _, _ = fer2013
    src = damaged_copy(root, tmp_path, case)
    out = tmp_path / "data"
    code, _, err = prepare(call_main, src, out, root / "manifest.csv")
    assert code == 2 and err.count("\n") == 1, err
    assert all(n in err for n in BAD_FOLDERS[case]), err
    assert not out.exists() or list(out.iterdir()) == []


def test_bad_sources_and_outputs(fer2013, tmp_path, call_main):
    root, _, _ = fer2013
    manifest = root / "manifest.csv"
    cases = [(tmp_path / "nowhere.csv", ["nowhere.csv does not exist", "give the downloaded fer2013.csv"])]
    cut = tmp_path / "cut.zip"
    cut.write_bytes(zip_of(root / "images", tmp_path / "whole.zip").read_bytes()[:5000])
    cases.append((cut, ["cannot read", "cut.zip", "download it again"]))
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    cases.append((text, ["neither a .csv nor a .zip / .tar.gz"]))
    for src, needles in cases:
        code, _, err = prepare(call_main, src, tmp_path / "data", manifest)
        assert code == 2 and err.count("\n") == 1 and all(n in err for n in needles), err
    # an --out that already holds prepared data is refused and left untouched
    out = tmp_path / "prepared"
    assert prepare(call_main, root / "fer2013.csv", out, manifest)[0] == 0
    before = {f: (out / f).read_bytes() for f in files(out)}
    code, _, err = prepare(call_main, root / "images", out, manifest)
    assert code == 2 and f"{out / 'fer5'} already exists" in err, err
    assert {f: (out / f).read_bytes() for f in files(out)} == before
    code, _, err = prepare(call_main, root / "fer2013.csv", tmp_path / "data", tmp_path / "no_manifest.csv")
    assert code == 2 and "cannot read the fer5 manifest" in err and "git checkout" in err, err


@pytest.mark.slow
def test_refusal_has_no_traceback_subprocess(fer2013, tmp_path):
    root, _, _ = fer2013
    src = csv_with(root, tmp_path, BAD_CSVS["emotion"][0])
    r = run_script("prepare.py", src, "--out", tmp_path / "data", "--manifest", root / "manifest.csv")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert_error(r.returncode, r.stderr, "data row 4", "emotion '7' is not a code 0-6", prog="prepare.py")


def test_the_csv_codes_are_fer2013s():
    """The tiny CSV here numbers the classes as prepare.py reads FER2013's codes 0-6."""
    assert prepare_py.FER2013_CLASSES == CLASSES
    assert set(prepare_py.USAGE_FOLDERS) == set(USAGES)


@pytest.mark.slow  # a Python of its own, to show that torch is never imported
def test_prepare_runs_without_torch(fer2013, tmp_path):
    """prepare.py needs Pillow alone: with every `import torch` failing, it still
    writes fer5/ and fer2013/ from the CSV."""
    (tmp_path / "no_torch" / "torch").mkdir(parents=True)
    (tmp_path / "no_torch" / "torch" / "__init__.py").write_text("raise ImportError('no torch here')\n")
    root, _, manifest = fer2013
    r = run_script("prepare.py", root / "fer2013.csv", "--out", tmp_path / "data", "--manifest", root / "manifest.csv",
                   env={**ENV, "PYTHONPATH": str(tmp_path / "no_torch")})
    assert r.returncode == 0, r.stderr
    assert len(files(tmp_path / "data" / "fer5")) == sum(m["fer2013_row"] != "" for m in manifest)
    assert len(files(tmp_path / "data" / "fer2013")) == 28


def test_the_shipped_manifest_defines_fer5():
    with open(ROOT / "data" / "fer5_manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    counts = {}
    for m in rows:
        counts[m["split"], m["class"]] = counts.get((m["split"], m["class"]), 0) + 1
    assert counts == {**{("train", c): n for c, n in zip(FER5, (500, 1500, 1000, 1500, 500))},
                      **{("test", c): 100 for c in FER5}}
    assert sum(m["fer2013_row"] == "" for m in rows) == 31


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "fer2013" / "train").is_dir(), reason="needs ../shared/data/fer2013")
def test_prepare_rebuilds_shared_fer5_byte_for_byte(tmp_path):
    r = run_script("prepare.py", SHARED / "fer2013", "--out", tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    for split in ("fer5", "fer2013"):
        assert files(tmp_path / split) == files(SHARED / split)
    assert all((tmp_path / "fer5" / f).read_bytes() == (SHARED / "fer5" / f).read_bytes()
               for f in files(SHARED / "fer5"))
