#!/usr/bin/env python
"""FER2013 as downloaded -> the image folders that fer.py trains and tests on.

    python prepare.py ~/Downloads/fer2013.csv     # -> data/fer5 (the report's split), data/fer2013

SRC is any public form of FER2013: Kaggle's fer2013.csv, the ICML challenge's
icml_face_data.csv, the widely used image-folder copy (train/<class>/,
test/<class>/), or the .zip / .tar.gz that holds one of them. fer5 is rebuilt face
by face from data/fer5_manifest.csv. Needs no torch: Pillow alone.

Every file is read as a stream, a row or an image at a time, never whole and never
unpacked to disk; what cannot be read, or is not FER2013, is refused in one line
before fer5/ or fer2013/ appear.
"""
import common  # first: it makes Ctrl-C while starting one line, not a traceback
import bz2
import codecs
import contextlib
import csv
import errno
import gzip
import hashlib
import io
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import time
import warnings
import zipfile
import zlib
from pathlib import Path

from PIL import Image

from common import IMG_EXTENSIONS, UNREADABLE_IMAGE, MANIFEST, FerError, make_folder, read_manifest

# Limits on what a source may hold, so that a hostile or broken download (a zip bomb, a
# file with no line breaks, an archive header that lies about sizes) is refused in one
# line instead of filling memory. FER2013's largest file, fer2013.csv, is 287 MB; its
# rows are under 10,000 characters; its 35,887 faces are 48x48, about 2 KB each.
MAX_FILE = 2**30  # bytes of a file, an archive member or a .tar's stream, counted as inflated
MAX_ROW = 2**16  # bytes of one CSV row: a line is read whole, so a file with no line breaks must stop
MAX_IMAGE = 2**24  # bytes of one image, which is read whole to be checked and copied
MAX_PIXELS = 2**22  # pixels of one image: a small PNG can decode to gigabytes
MAX_FILES = 250_000  # files in a source: their names are held until the faces are written
BLOCK = 2**16  # bytes read at a time, and looked at to tell what a file is

# fer2013.csv's emotion codes 0-6, by name; the image-folder copy uses the same names.
FER2013_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
# FER2013's three Usage values and the folder each goes to. PublicTest (the Kaggle
# public leaderboard) goes to a folder that neither `train` nor `test` reads.
USAGE_FOLDERS = {"Training": "train", "PrivateTest": "test", "PublicTest": "publictest"}
CSV_NAMES = ("fer2013.csv", "icml_face_data.csv")  # Kaggle's and the ICML challenge's
ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz")
FACE_SIDE = 48
FIX_SOURCE = ("give the downloaded fer2013.csv, icml_face_data.csv, the image-folder copy (train/<class>/, "
              "test/<class>/) or its .zip / .tar.gz")

# What a file starts with, when it is not text: (magic bytes, what it is, how to fix a
# CSV that is this). Browsers and tools rename downloads; say what the file really is.
MAGIC = (
    (b"\x1f\x8b", "gzip-compressed data", "decompress it (gunzip) or give the download as it is"),
    (b"PK\x03\x04", "a zip archive", "unzip it, or give it under a .zip name"),
    (b"PK\x05\x06", "an empty zip archive", "download it again"),
    (b"BZh", "bzip2-compressed data", "decompress it (bunzip2) or give the download as it is"),
    (b"\xfd7zXZ\x00", "xz-compressed data", "decompress it (unxz) or give the download as it is"),
    (b"(\xb5/\xfd", "zstd-compressed data", "decompress it (unzstd) or give the download as it is"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", "extract it (7z x) and give what it holds"),
    (b"Rar!\x1a\x07", "a RAR archive", "extract it (unrar x) and give what it holds"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image", "give the CSV itself"),
    (b"\xff\xd8\xff", "a JPEG image", "give the CSV itself"),
    (b"\xff\xfe", "UTF-16 text", "save it as UTF-8 (a spreadsheet's \"CSV UTF-8\")"),
    (b"\xfe\xff", "UTF-16 text", "save it as UTF-8 (a spreadsheet's \"CSV UTF-8\")"),
    (b"<!doctype html", "a web page (HTML)", "download fer2013.csv again: a sign-in page was saved instead"),
    (b"<html", "a web page (HTML)", "download fer2013.csv again: a sign-in page was saved instead"),
    (b"version https://git-lfs", "a Git LFS pointer", "fetch the file itself (git lfs pull)"),
)
# The compressions a .tar may have, by magic bytes: each is inflated here, so that its
# inflated bytes can be counted.
TAR_COMPRESSIONS = {b"\x1f\x8b": lambda f: gzip.GzipFile(fileobj=f), b"BZh": bz2.BZ2File,
                    b"\xfd7zXZ\x00": lzma.LZMAFile}
# What a damaged or cut-off download raises, when opened or when a member is read.
DAMAGED = (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError)


def damaged(where, e):
    return FerError(f"cannot read {where} ({e or type(e).__name__}); the download is damaged or incomplete: "
                    "download it again")


def too_big(where, limit):
    size = f"{limit / 2**30:g} GB" if limit >= 2**30 else f"{limit / 2**20:g} MB"
    return FerError(f"{where} is over the {size} limit, counted unpacked (FER2013's largest file, fer2013.csv, "
                    f"is 287 MB; its faces are about 2 KB); this is not FER2013: {FIX_SOURCE}")


def unreadable(path, e, src):
    """The one line for a path in SRC that cannot be read: a broken link, a link loop, no permission."""
    if isinstance(e, FileNotFoundError) and os.path.islink(path):
        return FerError(f"{path} is a broken symbolic link (to {os.readlink(path)}); remove it, "
                        "or restore what it points to")
    if e.errno == errno.ELOOP:
        return FerError(f"{path} is a symbolic link loop ({e.strerror}); remove the link")
    return FerError(f"cannot read {path} ({e.strerror or e}); make it readable (chmod -R u+rX {src}), "
                    "or give a copy you can read")


def what_is(head):
    """What a file that starts with HEAD is, if it is not text: e.g. ("gzip-compressed data", how to fix)."""
    for magic, what, fix in MAGIC:
        start = head.lstrip() if magic.startswith(b"<") else head  # a web page may start with blank lines
        if start[:len(magic)].lower() == magic.lower():
            return what, fix
    if head[257:262] == b"ustar":
        return "a tar archive", "extract it (tar xf), or give it under a .tar name"
    if b"\0" in head:
        return "binary data", "give fer2013.csv as downloaded"
    return None


class Counted(io.RawIOBase):
    """STREAM's bytes, refused past LIMIT: counted as they are read, because an archive's
    header can claim any size (a zip bomb's does)."""

    def __init__(self, stream, where, limit):
        super().__init__()
        self.stream, self.where, self.limit, self.pos = stream, where, limit, 0

    def readable(self):
        return True

    def readinto(self, buf):
        try:
            n = self.stream.readinto(buf)
        except DAMAGED as e:
            raise damaged(self.where, e) from None
        self.pos += n or 0
        if self.pos > self.limit:
            raise too_big(self.where, self.limit)
        return n

    def seekable(self):  # a zip inside a zip is read in place, which needs seeking
        with contextlib.suppress(AttributeError, OSError):
            return self.stream.seekable()
        return False

    def seek(self, offset, whence=io.SEEK_SET):
        try:
            self.pos = self.stream.seek(offset, whence)
        except DAMAGED as e:
            raise damaged(self.where, e) from None
        if self.pos > self.limit:
            raise too_big(self.where, self.limit)
        return self.pos

    def tell(self):
        return self.pos

    def close(self):
        try:
            self.stream.close()
        finally:
            super().close()


def member(where, open_raw, size):
    """`open(limit)` of a file whose header or directory entry says SIZE: refused at once
    if that is over LIMIT, and counted as it is read in case the header lies."""
    def open_limited(limit):
        if size > limit:
            raise too_big(where, limit)
        try:
            raw = open_raw()
        except DAMAGED as e:
            raise damaged(where, e) from None
        except RuntimeError as e:  # zipfile: an encrypted member, or a method it lacks (Deflate64)
            raise FerError(f"cannot unpack {where} ({e}); unpack the archive with another tool (unzip, 7-Zip) "
                           "and give the folder or the CSV it holds") from None
        return io.BufferedReader(Counted(raw, where, limit), BLOCK)
    return open_limited


def open_file(path, src):
    try:
        return open(path, "rb")
    except OSError as e:
        raise unreadable(path, e, src) from None


def entry_stat(path, src):
    try:
        return os.stat(path)
    except OSError as e:
        raise unreadable(path, e, src) from None


def too_many(src):
    return FerError(f"{src} holds more than {MAX_FILES:,} files, and FER2013 has 35,887 faces; "
                    "give the folder or archive that holds FER2013 alone")


def folder_files(src):
    """(name, path, size) of every file under the folder SRC, by name. What cannot be read
    stops it: Path.rglob skips an unreadable folder without a word, and a class would be missing."""
    def refuse(e):
        raise unreadable(e.filename or str(src), e, src)
    found, seen = [], set()
    for top, dirs, names in os.walk(src, onerror=refuse, followlinks=True):
        st = entry_stat(top, src)
        if (st.st_dev, st.st_ino) in seen:
            raise FerError(f"{top} leads back to a folder already read (a symbolic link loop); remove the link")
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(top, name)
            st = entry_stat(path, src)
            if not stat.S_ISREG(st.st_mode):
                continue  # a FIFO or a socket: no face, and reading a FIFO would wait forever
            if not os.access(path, os.R_OK):
                raise unreadable(path, PermissionError(errno.EACCES, os.strerror(errno.EACCES)), src)
            found.append((os.path.relpath(path, src).replace(os.sep, "/"), path, st.st_size))
            if len(found) > MAX_FILES:
                raise too_many(src)
    return found


def archive_files(where, open_stream):
    """(name, where, open) of every file in a .zip or a .tar (plain, .gz, .bz2, .xz), in the
    archive's order, read in place: `open(limit)` gives the file as a stream, readable
    until the next file is asked for."""
    with open_stream() as stream:
        try:
            head = stream.peek(BLOCK)[:BLOCK]
        except DAMAGED as e:
            raise damaged(where, e) from None
        if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            if not stream.seekable():
                raise FerError(f"{where} is a .zip inside a .tar, which cannot be read in place; "
                               "extract the .zip and give it")
            yield from zip_files(where, stream)
        elif head.startswith(tuple(TAR_COMPRESSIONS)) or head[257:262] == b"ustar":
            yield from tar_files(where, stream, head)
        else:
            what = "empty" if not head else (what_is(head) or ("text",))[0]
            raise FerError(f"{where} is {what}, not a .zip / .tar.gz archive; download it again")


def zip_files(where, stream):
    try:
        z = zipfile.ZipFile(stream)
        infos = [i for i in z.infolist() if not i.is_dir()]
    except DAMAGED as e:
        raise damaged(where, e) from None
    if len(infos) > MAX_FILES:
        raise too_many(where)
    with z:
        for info in infos:
            name = info.filename.replace("\\", "/")  # as some Windows tools write it
            yield name, f"{where}:{name}", member(f"{where}:{name}", lambda i=info: z.open(i), info.file_size)


def tar_files(where, stream, head):
    """A .tar read as a stream, one pass: its compression is inflated here, so that the
    inflated bytes are counted, and tarfile keeps no member it has passed."""
    inflate = next((f for magic, f in TAR_COMPRESSIONS.items() if head.startswith(magic)), None)
    data = io.BufferedReader(Counted(inflate(stream) if inflate else stream, where, MAX_FILE), BLOCK)
    try:
        t = tarfile.open(fileobj=data, mode="r|")
    except DAMAGED as e:
        raise damaged(where, e) from None
    with data, t:
        while True:
            try:
                m = t.next()
            except DAMAGED as e:
                raise damaged(where, e) from None
            if m is None:
                return
            t.members.clear()  # tarfile keeps every header it reads; a stream needs none of them
            if m.size > MAX_FILE:
                raise too_big(f"{where}:{m.name}", MAX_FILE)
            if m.isfile():
                name = f"{where}:{m.name}"
                yield m.name, name, member(name, lambda m=m: t.extractfile(m), m.size)


def names_of(files, src):
    """The names of FILES (a generator of (name, where, open), closed once read), at most MAX_FILES."""
    names = []
    with contextlib.closing(files):
        for name, _, _ in files:
            names.append(name)
            if len(names) > MAX_FILES:
                raise too_many(src)
    return names


def inner_files(files):
    """The files of the archives among FILES (Kaggle's zip holds fer2013.tar.gz), each read as a stream."""
    with contextlib.closing(files):
        for name, where, open_member in files:
            if name.lower().endswith(ARCHIVES):
                yield from archive_files(where, lambda: open_member(MAX_FILE))


def has_fer2013(names):
    return any(Path(n).name in CSV_NAMES or "/train/" in f"/{n}" for n in names)


def source_files(src):
    """(files, names): `files()` gives SRC's files as (name, where, open) one at a time, again
    each time it is called, and `names` are their names. An archive that holds archives and
    no FER2013 is read through the archives inside it."""
    if src.is_dir():
        found = folder_files(src)
        return (lambda: ((n, p, member(p, lambda p=p: open_file(p, src), size)) for n, p, size in found),
                [n for n, _, _ in found])
    top = lambda: archive_files(str(src), lambda: open_file(src, src))  # noqa: E731
    names = names_of(top(), src)
    if has_fer2013(names) or not any(n.lower().endswith(ARCHIVES) for n in names):
        return top, names
    return (lambda: inner_files(top())), names_of(inner_files(top()), src)


def face_key(name):
    """(split, class, file) of an image of the image-folder copy (.../train/<class>/<file>),
    or None: macOS's __MACOSX/ and ._* files beside the faces are not faces."""
    *parts, split, cls, file = ("", "", "") + tuple(name.split("/"))
    if split in ("train", "test") and cls.lower() in FER2013_CLASSES and Path(file).suffix.lower() in IMG_EXTENSIONS:
        if "__MACOSX" not in parts and not file.startswith("._"):
            return split, cls.lower(), file
    return None


def fer2013_source(src):
    """What SRC holds: ("csv", files, the CSV's name) or ("images", files, None), where
    `files()` gives SRC's files one at a time; anything it cannot read is refused now."""
    try:
        st = os.stat(src)
    except FileNotFoundError as e:
        if os.path.islink(src):
            raise unreadable(src, e, src) from None
        raise FerError(f"{src} does not exist; {FIX_SOURCE}") from None
    except OSError as e:
        raise unreadable(src, e, src) from None
    if stat.S_ISREG(st.st_mode) and src.suffix.lower() == ".csv":
        def plain():
            yield src.name, str(src), member(str(src), lambda: open_file(src, src), st.st_size)
        return "csv", plain, src.name
    if not stat.S_ISDIR(st.st_mode) and not (stat.S_ISREG(st.st_mode) and src.name.lower().endswith(ARCHIVES)):
        raise FerError(f"{src} is neither a .csv nor a .zip / .tar.gz nor a folder; {FIX_SOURCE}")
    files, names = source_files(src)
    csvs = [n for n in names if Path(n).name in CSV_NAMES]
    if csvs:
        return "csv", files, min(csvs, key=lambda n: CSV_NAMES.index(Path(n).name))  # fer2013.csv first
    if not {k[0] for k in map(face_key, names) if k} >= {"train", "test"}:
        raise FerError(f"{src} holds neither fer2013.csv / icml_face_data.csv nor the image-folder copy "
                       f"(train/<class>/*.jpg and test/<class>/*.jpg, classes {', '.join(FER2013_CLASSES)}); "
                       f"{FIX_SOURCE}")
    return "images", files, None


@contextlib.contextmanager
def opened(files, chosen):
    """(where, stream) of the file named CHOSEN among `files()`, open while in the `with`."""
    with contextlib.closing(files()) as each:
        for name, where, open_member in each:
            if name == chosen:
                with open_member(MAX_FILE) as f:
                    yield where, f
                return
    raise FerError(f"{chosen} is gone from the source while it was read; give a source that does not change")


class Lines:
    """The lines of a CSV's binary stream, for csv.reader: UTF-8 with a byte-order mark accepted
    (spreadsheet programs write one), read a line at a time, at most MAX_ROW bytes a row, so
    that no more than one row is ever held. `row` is the data row being read (-1: the header)."""

    def __init__(self, name, f):
        self.name, self.f, self.line, self.row, self.size = name, f, 0, -1, 0

    def where(self):
        return f"{self.name}, the header" if self.row < 0 else f"{self.name}, data row {self.row} (line {self.line})"

    def next_row(self):
        self.row, self.size = self.row + 1, 0

    def __iter__(self):
        return self

    def __next__(self):
        data = self.f.readline(MAX_ROW + 1 - self.size)
        if not data:
            raise StopIteration
        self.line, self.size = self.line + 1, self.size + len(data)
        if self.size > MAX_ROW and b"\r" in data:  # lines are split at \n: \r alone makes one long line
            raise FerError(f"{self.name} breaks its lines with \\r alone (an old Mac format); save it with "
                           "\\n or \\r\\n line breaks (Windows or Unix), or download fer2013.csv again")
        if self.size > MAX_ROW:
            raise FerError(f"{self.where()} is longer than {MAX_ROW:,} bytes, and FER2013's rows are under 10,000; "
                           "this is not FER2013's CSV: download fer2013.csv again")
        if self.line == 1:
            data = data.removeprefix(codecs.BOM_UTF8)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FerError(f"{self.where()} is not UTF-8 text (byte 0x{data[e.start]:02x} at column {e.start + 1}); "
                           "save the file as UTF-8, or download fer2013.csv again") from None


@contextlib.contextmanager
def csv_field_limit(limit):
    """csv's limit on a field set to LIMIT while in the `with`: the module's default (128 KB) is not ours."""
    old = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def csv_faces(name, f):
    """Checks the start of a FER2013 CSV now (what the file is, its header), and returns its
    (row, folder, class, 48x48 pixels as bytes), one at a time as they are read."""
    kind = what_is(f.peek(BLOCK)[:BLOCK])
    if kind:
        raise FerError(f"{name} is {kind[0]}, not a CSV; {kind[1]}")
    lines = Lines(name, f)
    reader = csv.reader(lines)
    try:
        header = [h.strip() for h in next(reader, [])]
    except csv.Error as e:
        raise FerError(f"{lines.where()} is not valid CSV ({e}); download fer2013.csv again") from None
    if not header:
        raise FerError(f"{name} is empty; download fer2013.csv (or icml_face_data.csv) again")
    if not {"emotion", "pixels", "Usage"} <= set(header):
        raise FerError(f"{name} has the columns {','.join(header)}, not emotion, pixels and Usage; "
                       "give fer2013.csv or icml_face_data.csv (Kaggle's train.csv / test.csv lack Usage)")
    return csv_rows(lines, reader, header)


def csv_rows(lines, reader, header):
    e_col, p_col, u_col = (header.index(c) for c in ("emotion", "pixels", "Usage"))
    fix = "the file is damaged or truncated: download it again"
    while True:
        lines.next_row()
        try:
            fields = next(reader, None)
        except csv.Error as e:
            raise FerError(f"{lines.where()} is not valid CSV ({e}); {fix}") from None
        if fields is None:
            break
        where, row = lines.where(), lines.row
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
    if lines.row == 0:
        raise FerError(f"{lines.name} has its header but no data rows; download fer2013.csv again")


def write_face(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def png(pixels):
    """A 48x48 grayscale face as PNG bytes: lossless, so the pixels are the CSV's."""
    buf = io.BytesIO()
    Image.frombytes("L", (FACE_SIDE, FACE_SIDE), pixels).save(buf, format="PNG")
    return buf.getvalue()


def prepare_from_csv(name, faces, manifest, tmp):
    """fer2013/<folder>/<class>/row_NNNNN.png for every row; fer5's faces by their row,
    named after the manifest's file. Returns the manifest faces left out, and why."""
    wanted = {int(m["fer2013_row"]): m for m in manifest if m["fer2013_row"]}
    rows = 0
    for rows, (row, folder, cls, pixels) in enumerate(faces, 1):
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


def check_image(where, data):
    """DATA is an image Pillow reads whole, of at most MAX_PIXELS: checked before it is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise FerError(f"{where} is {img.width}x{img.height} pixels, and FER2013's faces are 48x48; "
                                   "this is not FER2013's image-folder copy: download it again")
                img.load()
    except UNREADABLE_IMAGE as e:
        raise FerError(f"cannot read image {where} ({e}); the download is damaged: download it again") from None


def prepare_from_images(files, manifest, tmp):
    """Every face copied byte for byte, one at a time; fer5's checked against the manifest's SHA-256."""
    wanted = {(m["split"], m["class"], m["file"]): m for m in manifest}
    test_folders = {u: f for u, f in USAGE_FOLDERS.items() if u != "Training"}
    with contextlib.closing(files()) as each:
        for name, where, open_member in each:
            key = face_key(name)
            if key is None:
                continue
            (split, cls, file), data = key, read_all(where, open_member, MAX_IMAGE)
            check_image(where, data)
            folder = "train" if split == "train" else test_folders.get(file.split("_")[0])
            if folder is None:
                raise FerError(f"{where}: cannot tell its FER2013 split (the image-folder copy names test faces "
                               "PublicTest_* or PrivateTest_*, training faces Training_*); use that copy or the CSV")
            write_face(tmp / "fer2013" / folder / cls / file, data)
            m = wanted.pop(key, None)
            if m is not None:
                if hashlib.sha256(data).hexdigest() != m["sha256"]:
                    raise FerError(f"{where} is fer5's face {m['file']} but its bytes differ from the manifest's "
                                   "(SHA-256); this is not the widely used copy: download it again, or use fer2013.csv")
                write_face(tmp / "fer5" / m["split"] / cls / file, data)
    if wanted:
        (split, cls, file), _ = min(wanted.items())
        raise FerError(f"fer5's face {split}/{cls}/{file} is not in the source ({len(wanted)} of the manifest's "
                       f"{len(manifest)} missing); download the complete image-folder copy, or use fer2013.csv")
    return {}


def read_all(where, open_member, limit):
    with open_member(limit) as f:
        try:
            return f.read()
        except DAMAGED as e:
            raise damaged(where, e) from None


def check_manifest(rows, path):
    """The manifest's rows, each checked: its split, class and file name become paths under
    --out, so a file name such as ../../x must not get that far, and its row must be a number."""
    for line, m in enumerate(rows, 2):
        split, cls, file, row = (m.get(k) or "" for k in ("split", "class", "file", "fer2013_row"))
        is_name = file != "" and Path(file).name == file not in (".", "..") and "\\" not in file
        checks = (("split", split, "train or test", split in ("train", "test")),
                  ("class", cls, "a FER2013 class", cls in FER2013_CLASSES),
                  ("file", file, "a file name", is_name),
                  ("fer2013_row", row, "a row number or empty", not row or (row.isascii() and row.isdigit())))
        for column, value, expected, ok in checks:
            if not ok:
                raise FerError(f"the fer5 manifest {path}, line {line}: {column} {value!r} is not {expected}; "
                               "restore it (git checkout data/fer5_manifest.csv)")
    return rows


def count_faces(root):
    """{split: {class: number of files}} of a prepared folder, train first."""
    order = list(USAGE_FOLDERS.values())
    return {s.name: {c.name: sum(1 for _ in c.iterdir()) for c in sorted(s.iterdir())}
            for s in sorted(root.iterdir(), key=lambda s: order.index(s.name))}


def move_into_place(tmp, out):
    """TMP/fer2013 and TMP/fer5 -> OUT, fer5 last: once it is there, both are complete. If fer5
    cannot be moved, fer2013 goes back, so that a failure leaves neither."""
    os.replace(tmp / "fer2013", out / "fer2013")
    try:
        os.replace(tmp / "fer5", out / "fer5")
    except OSError:
        os.replace(out / "fer2013", tmp / "fer2013")  # removed with TMP
        raise


def cmd_prepare(args):
    """FER2013 as downloaded -> OUT/fer5 (the report's split, face by face as the
    manifest says) and OUT/fer2013 (all seven classes), written into a temporary
    folder and moved into place only once complete. What can be checked (the manifest,
    OUT, every file of SRC, the CSV's start) is checked before anything is written."""
    src, out = Path(args.src), Path(args.out)
    manifest = check_manifest(read_manifest(args.manifest), args.manifest)
    for d in ("fer5", "fer2013"):
        if os.path.lexists(out / d):
            raise FerError(f"{out / d} already exists; prepare writes new fer5/ and fer2013/ folders: "
                           f"choose another --out, or delete {out / d} to prepare it again")
    t0 = time.time()
    kind, files, chosen = fer2013_source(src)
    with contextlib.ExitStack() as stack:
        if kind == "csv":
            stack.enter_context(csv_field_limit(MAX_ROW))
            where, f = stack.enter_context(opened(files, chosen))
            faces = csv_faces(where, f)
        make_folder(out, "--out")
        try:
            tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
        except OSError as e:
            raise FerError(f"cannot write into --out folder {out} ({e.strerror}); choose another --out") from None
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        try:
            for d in ("fer2013", "fer5"):
                (tmp / d).mkdir()
            if kind == "csv":
                skipped = prepare_from_csv(where, faces, manifest, tmp)
            else:
                skipped = prepare_from_images(files, manifest, tmp)
            counts = {d: count_faces(tmp / d) for d in ("fer2013", "fer5")}
            move_into_place(tmp, out)
        except OSError as e:
            raise FerError(f"cannot write into {out} ({e.strerror}); free disk space or choose another --out") from None
    report(src, out, kind, time.time() - t0, counts, skipped)


def report(src, out, kind, seconds, counts, skipped):
    print(f"prepared {src} ({'CSV' if kind == 'csv' else 'image folders'}) in {seconds:.0f} s:")
    for d in ("fer5", "fer2013"):
        for split, per_class in counts[d].items():
            print(f"  {str(out / d / split) + ':':<{len(str(out)) + 20}} {sum(per_class.values()):6,d} faces  "
                  + "  ".join(f"{c} {n:,d}" for c, n in per_class.items()))
    if "publictest" in counts["fer2013"]:
        print(f"  {out / 'fer2013' / 'publictest'} holds FER2013's PublicTest faces; no command reads it by default")
    for why, n in skipped.items():
        print(f"  left out: {n} {why}")


def build_parser():
    p = common.script_parser("prepare.py", __doc__)
    p.add_argument("src", metavar="SRC", help="fer2013.csv, icml_face_data.csv, the image-folder copy "
                   "(train/<class>/, test/<class>/) or the .zip / .tar.gz holding one of them")
    p.add_argument("--out", default="data", help="folder to write fer5/ and fer2013/ into (default: %(default)s)")
    p.add_argument("--manifest", default=MANIFEST,
                   help="the fer5 split, face by face (default: data/fer5_manifest.csv beside prepare.py)")
    return p


def main(argv=None):
    return common.run_script("prepare.py", build_parser(), cmd_prepare, argv)


if __name__ == "__main__":
    main()
