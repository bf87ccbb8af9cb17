"""prepare.py against hostile and odd inputs: every file is read as a stream (a row or an
image at a time, never whole), its limits hold on crafted archives, and every input is
read right or refused in one line, `prepare.py: error: <what is wrong>; <how to fix it>`,
exit status 2, with nothing written.

Every input is built here, small: where a test would need a gigabyte, the limit is
lowered instead (monkeypatch); the tests marked slow keep the real limits and run
prepare.py in a subprocess under a memory cap.
"""
import bz2
import csv
import errno
import gzip
import hashlib
import io
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import traceback
import tracemalloc
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

import prepare
from conftest import ENV, ROOT

CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # the CSV's codes 0-6
FER5 = ("angry", "happy", "neutral", "sad", "surprise")
USAGES = ("Training", "PublicTest", "PrivateTest")
ROWS = [(c, u) for c in range(len(CLASSES)) for u in USAGES]  # 21 faces: (emotion code, Usage)
HEADER = "emotion,pixels,Usage\n"
NOTES = "the user's own file, beside where prepare writes\n"


def pixels_of(row):
    return bytes((row * 37 + i * 11) % 256 for i in range(48 * 48))


def csv_line(row, code, usage, end="\n"):
    return f"{code},{' '.join(map(str, pixels_of(row)))},{usage}{end}"


def csv_text(rows=ROWS, end="\n"):
    return HEADER.replace("\n", end) + "".join(csv_line(r, c, u, end) for r, (c, u) in enumerate(rows))


def image_bytes(pixels_or_image, fmt="JPEG"):
    img = pixels_or_image if isinstance(pixels_or_image, Image.Image) else Image.frombytes("L", (48, 48),
                                                                                         pixels_or_image)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_manifest(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["split", "class", "file", "sha256", "fer2013_row"])
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture
def fer(tmp_path):
    """A tiny FER2013 as fer2013.csv and as image folders, a manifest that picks fer5's
    faces from both, and an --out that already holds a file of the user's."""
    root = tmp_path / "fer"
    (root / "images").mkdir(parents=True)
    (root / "fer2013.csv").write_text(csv_text())
    manifest = []
    for r, (c, usage) in enumerate(ROWS):
        split = "train" if usage == "Training" else "test"
        name, data = f"{usage}_{1000 + r}.jpg", image_bytes(pixels_of(r))
        (root / "images" / split / CLASSES[c]).mkdir(parents=True, exist_ok=True)
        (root / "images" / split / CLASSES[c] / name).write_bytes(data)
        if CLASSES[c] in FER5 and usage != "PublicTest":
            manifest.append({"split": split, "class": CLASSES[c], "file": name,
                             "sha256": hashlib.sha256(data).hexdigest(), "fer2013_row": r})
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text(NOTES)
    return SimpleNamespace(root=root, csv=root / "fer2013.csv", images=root / "images", rows=manifest, out=out,
                           manifest=write_manifest(root / "manifest.csv", manifest))


@pytest.fixture
def run(capsys):
    """run(SRC, *ARGS): prepare.py SRC ARGS in this process, (exit status, stdout, stderr).
    An exception that escapes counts as what a user sees, a traceback and exit status 1,
    so that a test of an input the code before these checks mishandled fails by its assertion."""
    def call(*args):
        capsys.readouterr()
        try:
            prepare.main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
        except Exception:  # noqa: BLE001  (see above)
            code = 1
            sys.stderr.write(traceback.format_exc())
        out, err = capsys.readouterr()
        return code, out, err
    return call


def prep(run, fer, src, manifest=None):
    return run(src, "--out", fer.out, "--manifest", manifest or fer.manifest)


def assert_refused(result, fer, *needles):
    """Exit 2 and one line, `prepare.py: error: <what>; <fix>`, naming every needle; --out
    as it was (the user's file alone: no fer5/, fer2013/ or temporary folder)."""
    code, _, err = result
    assert code == 2, err
    assert err.startswith("prepare.py: error: ") and err.count("\n") == 1 and "; " in err, err
    for needle in needles:
        assert str(needle) in err, f"{needle!r} not in {err!r}"
    assert sorted(p.name for p in fer.out.iterdir()) == ["notes.txt"], err
    assert (fer.out / "notes.txt").read_text() == NOTES


def files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def same_faces(a, b):
    return files(a) == files(b) and all((a / f).read_bytes() == (b / f).read_bytes() for f in files(a))


def in_tar_gz(path, members):
    """A .tar.gz of MEMBERS: {name: bytes}."""
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def in_zip(path, members, method=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", method) as z:
        for name, data in members.items():
            z.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return path


def images_of(fer):
    return {f: (fer.images / f).read_bytes() for f in files(fer.images)}


# 1. Memory bounded by design: every form of the CSV streamed, and every limit


def csv_forms(fer, text):
    """The CSV TEXT as a plain file, in a .zip, in a .tar.gz, and in Kaggle's zip that holds fer2013.tar.gz."""
    data = text.encode()
    (fer.root / "plain").mkdir()
    forms = {"plain": fer.root / "plain" / "fer2013.csv", "zip": fer.root / "fer2013.zip",
             "tar.gz": fer.root / "fer2013.tar.gz", "kaggle": fer.root / "challenge.zip"}
    forms["plain"].write_bytes(data)
    in_zip(forms["zip"], {"fer2013.csv": data})
    in_tar_gz(forms["tar.gz"], {"fer2013/fer2013.csv": data})
    in_zip(forms["kaggle"], {"fer2013.tar.gz": forms["tar.gz"].read_bytes(), "example_submission.csv": b"id\n"})
    return forms


def test_every_form_of_the_csv_is_streamed(fer, run):
    """A 6 MB CSV whose second row is bad, in each form: refused at that row, having held
    well under a quarter of the file in Python's memory at once, since it is read a row
    at a time (the code before read every CSV whole into memory, and Kaggle's nested
    fer2013.tar.gz whole too, before its first row)."""
    padding = csv_line(0, 3, "Training") * 800
    forms = csv_forms(fer, HEADER + csv_line(0, 0, "Training") + csv_line(1, 9, "Training") + padding)
    size = forms["plain"].stat().st_size
    assert size > 6 * 2**20
    for form, src in forms.items():
        tracemalloc.start()
        try:
            result = prep(run, fer, src)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert_refused(result, fer, "data row 1 (line 3): emotion '9' is not a code 0-6")
        assert peak < size / 4, f"{form}: {peak / 2**20:.1f} MB held at once, of a {size / 2**20:.1f} MB CSV"


def zip_bomb(path, name, size):
    """A zip whose member NAME inflates past SIZE bytes of one repeated CSV row, written a
    megabyte at a time: the zip stays small (about 1/200 of SIZE), and nothing holds SIZE."""
    row = csv_line(0, 3, "Training").encode()
    chunk = row * (2**20 // len(row) + 1)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, z.open(name, "w", force_zip64=True) as f:
        f.write(HEADER.encode())
        for _ in range(size // len(chunk) + 1):
            f.write(chunk)
    return path


def test_zip_member_over_the_limit_is_refused(fer, run, monkeypatch):
    monkeypatch.setattr(prepare, "MAX_FILE", 2**20, raising=False)
    bomb = zip_bomb(fer.root / "bomb.zip", "fer2013.csv", 2**21)
    assert_refused(prep(run, fer, bomb), fer, f"{bomb}:fer2013.csv is over the 1 MB limit",
                   "this is not FER2013")


def test_tar_stream_over_the_limit_is_refused_as_it_is_read(fer, run, monkeypatch):
    """Each member is under the limit, their sum is not: the inflated bytes are counted
    as they are read, whatever the headers say."""
    monkeypatch.setattr(prepare, "MAX_FILE", 2**20, raising=False)
    members = {"fer2013/fer2013.csv": fer.csv.read_bytes()}
    members.update({f"fer2013/extra{i}.bin": bytes(600_000) for i in range(3)})
    src = in_tar_gz(fer.root / "fer2013.tar.gz", members)
    assert_refused(prep(run, fer, src), fer, f"{src} is over the 1 MB limit")


def test_plain_csv_over_the_limit_is_refused(fer, run, monkeypatch):
    monkeypatch.setattr(prepare, "MAX_FILE", 2**20, raising=False)
    src = fer.root / "big" / "fer2013.csv"
    src.parent.mkdir()
    src.write_text(csv_text(ROWS * 8))
    assert src.stat().st_size > 2**20
    assert_refused(prep(run, fer, src), fer, f"{src} is over the 1 MB limit")


@pytest.mark.parametrize("case", ["row over 64 KB", "field over csv's 128 KB", "no line breaks"])
def test_long_rows_are_refused(case, fer, run):
    """FER2013's rows are under 10,000 characters; a longer one is refused before it is
    held whole (csv's own limit gave a _csv.Error traceback)."""
    line = {"row over 64 KB": "3," + "1 " * 40_000 + ",Training\n",
            "field over csv's 128 KB": "3,\"" + "1 " * 70_000 + "\",Training\n",
            "no line breaks": "3," + "1 " * 600_000}[case]
    src = fer.root / "long" / "fer2013.csv"
    src.parent.mkdir()
    src.write_text(csv_text(ROWS[:3]) + line)
    assert_refused(prep(run, fer, src), fer, f"{src}, data row 3 (line 5) is longer than 65,536 bytes",
                   "FER2013's rows are under 10,000")


def test_lines_broken_by_a_lone_cr_are_refused_by_name(fer, run):
    src = fer.root / "mac" / "fer2013.csv"
    src.parent.mkdir()
    src.write_text(csv_text(end="\r"), newline="")
    assert_refused(prep(run, fer, src), fer, f"{src} breaks its lines with \\r alone", "\\r\\n line breaks")


def test_image_over_the_limits_is_refused(fer, run, monkeypatch):
    """An image is read whole, to be checked: over MAX_IMAGE bytes or MAX_PIXELS pixels
    (a small PNG can decode to gigabytes), it is refused before it is decoded."""
    big = fer.images / "train" / "happy" / "Training_2000.png"
    big.write_bytes(image_bytes(Image.new("L", (2100, 2100)), "PNG"))
    assert_refused(prep(run, fer, fer.images), fer, f"{big} is 2100x2100 pixels", "faces are 48x48")
    noise = Image.frombytes("L", (300, 300), os.urandom(90_000))
    big.write_bytes(image_bytes(noise, "PNG"))
    monkeypatch.setattr(prepare, "MAX_IMAGE", 2**16, raising=False)
    assert_refused(prep(run, fer, fer.images), fer, f"{big} is over the 0.0625 MB limit")


# 2. Every input read right, or refused: text


def assert_reads_like(run, fer, src, plain):
    """prepare on `src` writes the same faces as on the plain form `plain` of its data."""
    code, _, err = prep(run, fer, src)
    assert code == 0, err
    code, _, err = run(plain, "--out", fer.root / "plain_out", "--manifest", fer.manifest)
    assert code == 0, err
    for d in ("fer5", "fer2013"):
        assert files(fer.out / d) and same_faces(fer.out / d, fer.root / "plain_out" / d)


def test_csv_with_byte_order_mark_and_crlf_reads_like_the_plain_one(fer, run):
    """As a spreadsheet program saves it: a UTF-8 byte-order mark and \\r\\n line ends."""
    src = fer.root / "excel" / "fer2013.csv"
    src.parent.mkdir()
    src.write_bytes(b"\xef\xbb\xbf" + csv_text(end="\r\n").encode())
    assert_reads_like(run, fer, src, fer.csv)


def test_csv_not_in_utf8_is_refused_with_its_row(fer, run):
    src = fer.root / "latin1" / "fer2013.csv"
    src.parent.mkdir()
    lines = csv_text().splitlines(keepends=True)
    lines[4] = csv_line(3, 1, "Trainé")
    src.write_bytes("".join(lines).encode("latin-1"))
    assert_refused(prep(run, fer, src), fer, f"{src}, data row 3 (line 5) is not UTF-8 text (byte 0xe9",
                   "save the file as UTF-8")


BINARY = {  # what is under the name fer2013.csv -> what prepare says it is
    "gzip": (lambda t: gzip.compress(t), "gzip-compressed data", "gunzip"),
    "zip": (lambda t: in_zip(io.BytesIO(), {"fer2013.csv": t}).getvalue(), "a zip archive", "unzip it"),
    "bzip2": (bz2.compress, "bzip2-compressed data", "bunzip2"),
    "xz": (lzma.compress, "xz-compressed data", "unxz"),
    "7z": (lambda t: b"7z\xbc\xaf\x27\x1c\x00\x04" + t, "a 7-Zip archive", "7z x"),
    "png": (lambda t: image_bytes(pixels_of(0), "PNG"), "a PNG image", "the CSV itself"),
    "jpeg": (lambda t: image_bytes(pixels_of(0)), "a JPEG image", "the CSV itself"),
    "utf-16": (lambda t: t.decode().encode("utf-16"), "UTF-16 text", "save it as UTF-8"),
    "html": (lambda t: b"\n<!DOCTYPE html><html><body>Sign in</body></html>\n", "a web page (HTML)", "download"),
    "git lfs": (lambda t: b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 301072766\n",
                "a Git LFS pointer", "git lfs pull"),
    "nul bytes": (lambda t: t[:100] + bytes(100) + t[200:], "binary data", "as downloaded"),
}


@pytest.mark.parametrize("case", sorted(BINARY))
def test_binary_under_a_csv_name_is_named(case, fer, run):
    make, what, fix = BINARY[case]
    src = fer.root / case / "fer2013.csv"
    src.parent.mkdir()
    src.write_bytes(make(fer.csv.read_bytes()))
    assert_refused(prep(run, fer, src), fer, f"{src} is {what}, not a CSV; ", fix)


def test_csv_error_is_one_line(fer, run):
    """A \\r inside a row, which csv.reader refuses: one line, not a _csv.Error traceback."""
    src = fer.root / "cr" / "fer2013.csv"
    src.parent.mkdir()
    lines = csv_text().splitlines(keepends=True)
    lines[3] = lines[3].replace(" ", "\r", 1)
    src.write_text("".join(lines), newline="")
    assert_refused(prep(run, fer, src), fer, f"{src}, data row 2 (line 4) is not valid CSV")


def test_csv_with_a_header_alone_says_so(fer, run):
    src = fer.root / "header" / "fer2013.csv"
    src.parent.mkdir()
    src.write_text(HEADER)
    assert_refused(prep(run, fer, src), fer, f"{src} has its header but no data rows")


def test_the_manifest_is_utf8_with_or_without_byte_order_mark(fer, run):
    bom = fer.root / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + fer.manifest.read_bytes())
    code, _, err = prep(run, fer, fer.csv, bom)
    assert code == 0, err
    shutil.rmtree(fer.out / "fer5"), shutil.rmtree(fer.out / "fer2013")
    latin = fer.root / "latin.csv"
    latin.write_bytes(fer.manifest.read_bytes().replace(b"Training_1000", b"Training_\xe9"))
    assert_refused(prep(run, fer, fer.csv, latin), fer, f"the fer5 manifest {latin} is not a UTF-8 CSV",
                   "git checkout data/fer5_manifest.csv")


BAD_MANIFESTS = {  # what the manifest is -> what the refusal says
    "header alone": (lambda rows: [], "has its header but no rows"),
    "row not a number": (lambda rows: [dict(rows[0], fer2013_row="12a")] + rows[1:], "fer2013_row '12a' is not"),
    "split": (lambda rows: [dict(rows[0], split="validation")] + rows[1:], "split 'validation' is not train or test"),
    "file in another folder": (lambda rows: [dict(rows[0], file="../../Training_1000.jpg")] + rows[1:],
                               "file '../../Training_1000.jpg' is not a file name"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_manifest_is_blamed_not_the_csv(case, fer, run):
    edit, needle = BAD_MANIFESTS[case]
    bad = write_manifest(fer.root / "bad.csv", edit(fer.rows))
    assert_refused(prep(run, fer, fer.csv, bad), fer, f"the fer5 manifest {bad}", needle, "git checkout")


# 2. Every input read right, or refused: files that cannot be read


def test_broken_symlink_in_the_folder_is_named(fer, run):
    link = fer.images / "test" / "sad" / "PrivateTest_9999.jpg"
    link.symlink_to("nowhere.jpg")
    assert_refused(prep(run, fer, fer.images), fer, f"{link} is a broken symbolic link (to nowhere.jpg)")


def test_symlink_loops_are_named(fer, run):
    loop = fer.images / "train" / "loop"
    loop.symlink_to("..")
    assert_refused(prep(run, fer, fer.images), fer, f"{loop} leads back to a folder already read")
    loop.unlink()
    itself = fer.images / "train" / "happy" / "Training_1999.jpg"
    itself.symlink_to(itself.name)
    assert_refused(prep(run, fer, fer.images), fer, f"{itself} is a symbolic link loop")


def deny(monkeypatch, module, name, blocked):
    """MODULE.NAME(path, ...) raises PermissionError for BLOCKED, as without read permission:
    root reads files whatever their permissions, so chmod cannot show it here."""
    real = getattr(module, name, None) or open

    def denied(path, *args, **kwargs):
        if Path(path) == blocked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(module, name, denied, raising=False)


@pytest.mark.parametrize("where", ["sub-folder", "the folder itself"])
def test_unreadable_folder_stops_prepare(where, fer, run, monkeypatch):
    """os.walk and Path.rglob skip a folder they cannot list without a word: a class of
    fer2013/ would be missing, or the source said to hold neither layout."""
    blocked = fer.images / "train" / "fear" if where == "sub-folder" else fer.images
    deny(monkeypatch, os, "scandir", blocked)
    assert_refused(prep(run, fer, fer.images), fer, f"cannot read {blocked} (Permission denied)", "chmod")


def test_unreadable_file_in_the_folder_stops_prepare(fer, run, monkeypatch):
    blocked = fer.images / "train" / "fear" / "Training_1006.jpg"
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != blocked and real(p, mode, **kw))
    assert_refused(prep(run, fer, fer.images), fer, f"cannot read {blocked} (Permission denied)")


@pytest.mark.parametrize("kind", ["csv", "zip"])
def test_unreadable_source_file_is_named(kind, fer, run, monkeypatch):
    src = fer.csv if kind == "csv" else in_zip(fer.root / "images.zip", images_of(fer))
    deny(monkeypatch, prepare, "open", src)
    assert_refused(prep(run, fer, src), fer, f"cannot read {src} (Permission denied)")


def test_broken_symlink_as_source_is_named(fer, run):
    link = fer.root / "fer2013_link.csv"
    link.symlink_to(fer.root / "gone.csv")
    assert_refused(prep(run, fer, link), fer, f"{link} is a broken symbolic link")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads what chmod forbids")
@pytest.mark.parametrize("what", ["folder", "file"])
def test_chmod_000_stops_prepare(what, fer, run):
    blocked = fer.images / "test" / "sad" if what == "folder" else fer.images / "train" / "sad" / "Training_1012.jpg"
    blocked.chmod(0)
    try:
        assert_refused(prep(run, fer, fer.images), fer, f"cannot read {blocked}", "Permission denied")
    finally:
        blocked.chmod(0o755)


def test_holds_neither_says_what_to_give(fer, run):
    (fer.root / "other" / "train").mkdir(parents=True)
    assert_refused(prep(run, fer, fer.root / "other"), fer, "holds neither fer2013.csv",
                   "; give the downloaded fer2013.csv")


# 2. Every input read right, or refused: archives


def patched_zip(path, data, offsets):
    """The zip DATA with bytes changed at OFFSETS past its (one) member's local header and
    central directory entry: {offset: byte} for each."""
    data = bytearray(data)
    local, central = data.index(b"PK\x03\x04"), data.index(b"PK\x01\x02")
    for (at_local, at_central), value in offsets.items():
        for at in (local + at_local, central + at_central):
            data[at] = value(data[at])
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("case", ["encrypted", "Deflate64"])
def test_zip_member_python_cannot_unpack_is_named(case, fer, run):
    data = in_zip(io.BytesIO(), {"fer2013.csv": fer.csv.read_bytes()}).getvalue()
    edit = {(6, 8): lambda b: b | 1} if case == "encrypted" else {(8, 10): lambda b: 9}  # flag bit 0; method 9
    src = patched_zip(fer.root / "fer2013.zip", data, edit)
    assert_refused(prep(run, fer, src), fer, f"cannot unpack {src}:fer2013.csv", "unzip, 7-Zip")


def test_zip_with_backslashes_and_macos_files_reads_like_the_folder(fer, run):
    """Some Windows tools write zip paths with \\, and macOS adds __MACOSX/ and ._* files."""
    images = images_of(fer)
    members = {f.replace("/", "\\"): data for f, data in images.items()}
    members.update({f"__MACOSX/{f.rsplit('/', 1)[0]}/._{f.rsplit('/', 1)[1]}": b"\0\5\26\7" for f in images})
    members["train/happy/._Training_1009.jpg"] = b"\0\5\26\7 AppleDouble"
    src = in_zip(fer.root / "images.zip", members)
    assert_reads_like(run, fer, src, fer.images)


def test_archive_that_is_a_web_page_is_named(fer, run):
    src = fer.root / "fer2013.zip"
    src.write_bytes(b"<!doctype html><html><body>Please sign in</body></html>")
    assert_refused(prep(run, fer, src), fer, f"{src} is a web page (HTML), not a .zip / .tar.gz archive")


# 3. Nothing half-written


def test_failed_move_leaves_neither_folder(fer, run, monkeypatch):
    """fer2013/ is moved into --out first; if fer5/ then cannot be, fer2013/ goes back."""
    real = os.replace

    def replace(a, b):
        if Path(b) == fer.out / "fer5":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(a, b)
    monkeypatch.setattr(os, "replace", replace)
    assert_refused(prep(run, fer, fer.csv), fer, f"cannot write into {fer.out} (No space left on device)")


# Peak memory of prepare.py itself, with the real limits


# Runs ARGV[3:] in a child of its own under an address-space cap of ARGV[1] bytes, its
# stdout to ARGV[2], and prints the child's peak resident memory (bytes) from wait4. A
# child forked straight from pytest would count pytest's own memory (torch's hundreds of
# MB, which a fork's ru_maxrss carries across exec); this small Python has none of it.
LAUNCHER = """
import os, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
pid = os.fork()
if pid == 0:
    os.dup2(os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
    os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss * 1024)
sys.exit(os.waitstatus_to_exitcode(status))
"""


# prepare.py's peak resident memory, at most: Python, Pillow and prepare.py's modules take
# about 25 MB, what it reads adds a few MB whatever the size of the file.
PEAK = 60 * 2**20


def capped_run(args, tmp_path, cap=3 * 2**29):
    """`python prepare.py ARGS` with at most CAP bytes (1.5 GB) of address space (it imports
    no torch): (exit status, stderr, its peak resident memory in bytes)."""
    r = subprocess.run([sys.executable, "-c", LAUNCHER, str(cap), str(tmp_path / "stdout.txt"),
                        str(ROOT / "prepare.py"), *map(str, args)], env=ENV, capture_output=True, text=True,
                       timeout=600)
    return r.returncode, r.stderr, int(r.stdout)


class ZeroReader(io.RawIOBase):
    """SIZE zero bytes, made as they are read."""

    def __init__(self, size):
        super().__init__()
        self.left = size

    def readable(self):
        return True

    def readinto(self, buf):
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    """Inputs over the real 1 GB limit, built as streams: a zip whose fer2013.csv inflates
    to 1 GB of rows (5 MB), a sparse fer2013.csv of 1 GB (no disk), and a .tar.gz whose two
    members of 600 MB each are under the limit but their sum is not (5 MB)."""
    root = tmp_path_factory.mktemp("bombs")
    zip_bomb(root / "bomb.zip", "fer2013.csv", 2**30)
    (root / "sparse").mkdir()
    with open(root / "sparse" / "fer2013.csv", "wb") as f:
        f.write(HEADER.encode())
        f.truncate(2**30 + 1)
    with open(root / "bomb.tar.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as g, \
            tarfile.open(fileobj=g, mode="w|") as t:
        for name in ("fer2013/fer2013.csv", "fer2013/extra.bin"):
            info = tarfile.TarInfo(name)
            info.size = 600 * 2**20
            t.addfile(info, ZeroReader(info.size))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("bomb, needle", [("bomb.zip", "bomb.zip:fer2013.csv is over the 1 GB limit"),
                                          ("sparse/fer2013.csv", "fer2013.csv is over the 1 GB limit"),
                                          ("bomb.tar.gz", "bomb.tar.gz is over the 1 GB limit")])
def test_bombs_are_refused_in_little_memory(bomb, needle, bombs, tmp_path):
    """Under a 1.5 GB cap on its address space, prepare.py refuses each in one line, its
    peak resident memory that of Python and Pillow (the code before read the zip's 1 GB
    member whole into memory, and the CSV whole)."""
    out = tmp_path / "out"
    code, err, peak = capped_run([bombs / bomb, "--out", out, "--manifest", ROOT / "data" / "fer5_manifest.csv"],
                                 tmp_path)
    assert code == 2 and err.startswith("prepare.py: error: ") and err.count("\n") == 1, err
    assert needle in err, err
    assert peak < PEAK, f"peak resident memory {peak / 2**20:.0f} MB"
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.slow
def test_prepare_reads_the_csv_zip_in_little_memory(tmp_path):
    """A 30 MB CSV in a zip, prepared whole in a subprocess: its peak resident memory
    stays that of Python and Pillow, far under the CSV's size plus it."""
    rows = [(c, u) for c, u in ROWS] * 200  # 4,200 rows, 30 MB
    src = in_zip(tmp_path / "fer2013.zip", {"fer2013.csv": csv_text(rows).encode()})
    manifest = write_manifest(tmp_path / "manifest.csv", [
        {"split": "train", "class": "angry", "file": "Training_1.jpg", "sha256": "0" * 64, "fer2013_row": 0}])
    code, err, peak = capped_run([src, "--out", tmp_path / "out", "--manifest", manifest], tmp_path)
    assert code == 0, err
    assert len(files(tmp_path / "out" / "fer2013")) == len(rows)
    assert peak < PEAK, f"peak resident memory {peak / 2**20:.0f} MB"
