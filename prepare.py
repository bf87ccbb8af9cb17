#!/usr/bin/env python
"""FER2013 as downloaded -> the image folders that fer.py trains and tests on.

    python prepare.py ~/Downloads/fer2013.csv     # -> data/fer5 (the report's split), data/fer2013

SRC is any public form of FER2013: Kaggle's fer2013.csv, the ICML challenge's
icml_face_data.csv, the widely used image-folder copy (train/<class>/,
test/<class>/), or the .zip / .tar.gz that holds one of them. fer5 is rebuilt face
by face from data/fer5_manifest.csv. Needs no torch: Pillow alone.
"""
import common  # first: it makes Ctrl-C while starting one line, not a traceback
import argparse
import csv
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

from PIL import Image

from common import IMG_EXTENSIONS, MANIFEST, FerError, Parser, make_folder, read_manifest

# fer2013.csv's emotion codes 0-6, by name; the image-folder copy uses the same names.
FER2013_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
# FER2013's three Usage values and the folder each goes to. PublicTest (the Kaggle
# public leaderboard) goes to a folder that neither `train` nor `test` reads.
USAGE_FOLDERS = {"Training": "train", "PrivateTest": "test", "PublicTest": "publictest"}


CSV_NAMES = ("fer2013.csv", "icml_face_data.csv")  # Kaggle's and the ICML challenge's


ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz")


FACE_SIDE = 48


def source_files(src):
    """(name, read) of every file in a folder or archive: `name` is its path inside
    SRC and `read()` returns its bytes."""
    if src.is_dir():
        return [(p.relative_to(src).as_posix(), safely(p.read_bytes, p, "the folder"))
                for p in sorted(src.rglob("*")) if p.is_file()]
    return archive_files(str(src), open(src, "rb"))


# What a damaged or cut-off download raises, when opened or when a member is read.
DAMAGED = (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error)


def safely(read, member, source):
    """`read`, with a damaged download's error turned into one line naming the member."""
    def call():
        try:
            return read()
        except DAMAGED as e:
            raise FerError(f"cannot read {member} from {source} ({e or type(e).__name__}); the download "
                           "is damaged or incomplete: download it again") from None
    return call


def archive_files(name, opened, nested=True):
    """(name, read) of every file in a .zip or a .tar(.gz), read in place; an archive
    inside (Kaggle's zip holds fer2013.tar.gz) is opened in memory, never unpacked."""
    try:
        if name.lower().endswith(".zip"):
            z = zipfile.ZipFile(opened)
            files = [(i.filename, safely(lambda i=i: z.read(i), i.filename, name)) for i in z.infolist() if not i.is_dir()]
        else:
            t = tarfile.open(fileobj=opened)  # any compression
            files = [(m.name, safely(lambda m=m: t.extractfile(m).read(), m.name, name)) for m in t.getmembers() if m.isfile()]
    except DAMAGED as e:
        raise FerError(f"cannot read {name} ({e or type(e).__name__}); the download is damaged or "
                       "incomplete: download it again") from None
    inner = [(n, read) for n, read in files if n.lower().endswith(ARCHIVES)]
    if nested and inner and not any(Path(n).name in CSV_NAMES or "/train/" in f"/{n}" for n, _ in files):
        return [f for n, read in inner for f in archive_files(f"{name}:{n}", io.BytesIO(read()), nested=False)]
    return files


def fer2013_source(src):
    """What SRC holds: ("csv", name, read) or ("images", files by (split, class, file))."""
    if not src.exists():
        raise FerError(f"{src} does not exist; give the downloaded fer2013.csv, icml_face_data.csv, "
                       "the image-folder copy (train/<class>/, test/<class>/) or its .zip / .tar.gz")
    if src.is_file() and src.suffix.lower() == ".csv":
        return "csv", str(src), src.read_bytes
    if src.is_file() and not src.name.lower().endswith(ARCHIVES):
        raise FerError(f"{src} is neither a .csv nor a .zip / .tar.gz; give fer2013.csv, "
                       "icml_face_data.csv, the image-folder copy or its download as it is")
    files = source_files(src)
    csvs = [(n, read) for n, read in files if Path(n).name in CSV_NAMES]
    if csvs:
        name, read = min(csvs, key=lambda f: CSV_NAMES.index(Path(f[0]).name))  # fer2013.csv first
        return "csv", f"{src}:{name}", read
    images = {}
    for name, read in files:
        *_, split, cls, file = ("", "", "") + tuple(name.split("/"))
        if split in ("train", "test") and cls.lower() in FER2013_CLASSES and Path(file).suffix.lower() in IMG_EXTENSIONS:
            images[split, cls.lower(), file] = (f"{src}:{name}" if src.is_file() else str(src / name), read)
    if not {s for s, _, _ in images} >= {"train", "test"}:
        raise FerError(f"{src} holds neither fer2013.csv / icml_face_data.csv nor the image-folder copy "
                       f"(train/<class>/*.jpg and test/<class>/*.jpg, classes {', '.join(FER2013_CLASSES)})")
    return "images", images


def csv_faces(name, read):
    """(row, folder, class, 48x48 pixels as bytes) of each data row of a FER2013 CSV,
    checked as it is read: one bad row stops everything, with its number."""
    text = io.TextIOWrapper(io.BytesIO(read()), encoding="utf-8", newline="")
    reader = csv.reader(text)
    header = [h.strip() for h in next(reader, [])]
    if not header:
        raise FerError(f"{name} is empty; download fer2013.csv (or icml_face_data.csv) again")
    if not {"emotion", "pixels", "Usage"} <= set(header):
        raise FerError(f"{name} has the columns {','.join(header)}, not emotion, pixels and Usage: "
                       "give fer2013.csv or icml_face_data.csv (Kaggle's train.csv / test.csv lack Usage)")
    e_col, p_col, u_col = (header.index(c) for c in ("emotion", "pixels", "Usage"))
    fix = "the file is damaged or truncated: download it again"
    for row, fields in enumerate(reader):
        where = f"{name}, data row {row} (line {row + 2})"
        if len(fields) != len(header):
            raise FerError(f"{where} has {len(fields)} fields, not {len(header)}; {fix}")
        emotion, usage = fields[e_col].strip(), fields[u_col].strip()
        if emotion not in tuple("0123456"):
            raise FerError(f"{where}: emotion {emotion!r} is not a code 0-6; {fix}")
        if usage not in USAGE_FOLDERS:
            raise FerError(f"{where}: Usage {usage!r} is none of {', '.join(USAGE_FOLDERS)}; {fix}")
        try:
            pixels = bytes(int(v) for v in fields[p_col].split())
        except ValueError:
            raise FerError(f"{where}: the pixels are not numbers 0-255; {fix}") from None
        if len(pixels) != FACE_SIDE * FACE_SIDE:
            raise FerError(f"{where} has {len(pixels)} pixels, not {FACE_SIDE}x{FACE_SIDE}; {fix}")
        yield row, USAGE_FOLDERS[usage], FER2013_CLASSES[int(emotion)], pixels


def write_face(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def png(pixels):
    """A 48x48 grayscale face as PNG bytes: lossless, so the pixels are the CSV's."""
    buf = io.BytesIO()
    Image.frombytes("L", (FACE_SIDE, FACE_SIDE), pixels).save(buf, format="PNG")
    return buf.getvalue()


def prepare_from_csv(name, read, manifest, tmp):
    """fer2013/<folder>/<class>/row_NNNNN.png for every row; fer5's faces by their row,
    named after the manifest's file. Returns the manifest faces left out, and why."""
    wanted = {int(m["fer2013_row"]): m for m in manifest if m["fer2013_row"]}
    rows = 0
    for rows, (row, folder, cls, pixels) in enumerate(csv_faces(name, read), 1):
        data = png(pixels)
        write_face(tmp / "fer2013" / folder / cls / f"row_{row:05d}.png", data)
        m = wanted.pop(row, None)
        if m is not None:
            if (cls, folder) != (m["class"], m["split"]):
                raise FerError(f"{name}, data row {row} is {cls} ({folder}) but the manifest's fer5 face "
                               f"{m['file']} is {m['class']} ({m['split']}): this is not the original "
                               "FER2013 CSV; download fer2013.csv again")
            write_face(tmp / "fer5" / m["split"] / m["class"] / f"{Path(m['file']).stem}.png", data)
    if wanted:
        row, m = min(wanted.items())
        raise FerError(f"{name} has {rows} data rows, so fer5's face {m['file']} (row {row}) is missing; "
                       "the file is truncated: download it again")
    unknown = sum(not m["fer2013_row"] for m in manifest)
    return {"fer5 faces whose fer2013.csv row is unknown (the manifest leaves it empty)": unknown} if unknown else {}


def prepare_from_images(images, manifest, tmp):
    """Every face copied byte for byte; fer5's checked against the manifest's SHA-256."""
    wanted = {(m["split"], m["class"], m["file"]): m for m in manifest}
    for (split, cls, file), (name, read) in images.items():
        data = read()
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise FerError(f"cannot read image {name} ({e}); the download is damaged: download it again") from None
        test_folders = {u: f for u, f in USAGE_FOLDERS.items() if u != "Training"}
        folder = "train" if split == "train" else test_folders.get(file.split("_")[0])
        if folder is None:
            raise FerError(f"{name}: cannot tell its FER2013 split (the image-folder copy names test faces "
                           "PublicTest_* or PrivateTest_*, training faces Training_*); use that copy or the CSV")
        write_face(tmp / "fer2013" / folder / cls / file, data)
        m = wanted.pop((split, cls, file), None)
        if m is not None:
            if hashlib.sha256(data).hexdigest() != m["sha256"]:
                raise FerError(f"{name} is fer5's face {m['file']} but its bytes differ from the manifest's "
                               "(SHA-256); this is not the widely used copy: download it again, or use fer2013.csv")
            write_face(tmp / "fer5" / m["split"] / cls / file, data)
    if wanted:
        (split, cls, file), _ = min(wanted.items())
        raise FerError(f"fer5's face {split}/{cls}/{file} is not in the source ({len(wanted)} of the manifest's "
                       f"{len(manifest)} missing); download the complete image-folder copy, or use fer2013.csv")
    return {}


def count_faces(root):
    """{split: {class: number of files}} of a prepared folder, train first."""
    order = list(USAGE_FOLDERS.values())
    return {s.name: {c.name: sum(1 for _ in c.iterdir()) for c in sorted(s.iterdir())}
            for s in sorted(root.iterdir(), key=lambda s: order.index(s.name))}


def cmd_prepare(args):
    """FER2013 as downloaded -> OUT/fer5 (the report's split, face by face as the
    manifest says) and OUT/fer2013 (all seven classes), written into a temporary
    folder and moved into place only once complete."""
    src, out = Path(args.src), Path(args.out)
    manifest = read_manifest(args.manifest)
    for d in ("fer5", "fer2013"):
        if (out / d).exists():
            raise FerError(f"{out / d} already exists; prepare writes new fer5/ and fer2013/ folders: "
                           f"choose another --out, or delete {out / d} to prepare it again")
    t0 = time.time()
    source = fer2013_source(src)
    make_folder(out, "--out")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
    except OSError as e:
        raise FerError(f"cannot write into --out folder {out} ({e.strerror}); choose another --out") from None
    try:
        if source[0] == "csv":
            skipped = prepare_from_csv(source[1], source[2], manifest, tmp)
        else:
            skipped = prepare_from_images(source[1], manifest, tmp)
        counts = {d: count_faces(tmp / d) for d in ("fer2013", "fer5")}
        for d in counts:  # fer5 last: once it is there, both are complete
            os.replace(tmp / d, out / d)
    except OSError as e:
        raise FerError(f"cannot write into {out} ({e.strerror}); free disk space or choose another --out") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"prepared {src} ({'CSV' if source[0] == 'csv' else 'image folders'}) in {time.time() - t0:.0f} s:")
    for d in ("fer5", "fer2013"):
        for split, per_class in counts[d].items():
            print(f"  {str(out / d / split) + ':':<{len(str(out)) + 20}} {sum(per_class.values()):6,d} faces  "
                + "  ".join(f"{c} {n:,d}" for c, n in per_class.items()))
    if "publictest" in counts["fer2013"]:
        print(f"  {out / 'fer2013' / 'publictest'} holds FER2013's PublicTest faces; no command reads it by default")
    for why, n in skipped.items():
        print(f"  left out: {n} {why}")


def build_parser():
    p = Parser(prog="prepare.py", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="fer2013.csv, icml_face_data.csv, the image-folder copy "
                   "(train/<class>/, test/<class>/) or the .zip / .tar.gz holding one of them")
    p.add_argument("--out", default="data", help="folder to write fer5/ and fer2013/ into (default: %(default)s)")
    p.add_argument("--manifest", default=MANIFEST,
                   help="the fer5 split, face by face (default: data/fer5_manifest.csv beside prepare.py)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return common.guard("prepare.py", lambda: cmd_prepare(args))


if __name__ == "__main__":
    main()
