#!/usr/bin/env python
"""fer: facial expression recognition with classic CNNs trained from scratch.

    python fer.py prepare  ~/Downloads/fer2013.csv        # -> data/fer5, data/fer2013
    python fer.py train    --model resnet34                # on data/fer5 -> runs/resnet34/
    python fer.py validate --checkpoint runs/resnet34/best.pt
    python fer.py test     --checkpoint runs/resnet34/best.pt
    python fer.py test     --checkpoint runs/resnet34/best.pt runs/vgg11/best.pt   # an ensemble
    python fer.py predict  samples/ face.jpg               # the shipped checkpoint by default
    python fer.py bench    --model resnet34
    python fer.py export   --checkpoint runs/resnet34/best.pt --out checkpoints/resnet34.pt

This file owns the data, the loops, the checkpoints and the command line;
nets.py holds the networks and metrics.py the confusion-matrix metrics.
Run `python fer.py <command> --help` for every option and its default.

Contents, top to bottom: recipes and constants; data (image folders decoded into
tensors, augmentation, test-time views; `prepare`'s readers of FER2013); runtime
(device, precision, processes); models and checkpoints; the loops (one training
epoch, one evaluation); the commands prepare, train, validate, test; using a
model (predict, pictures, export); bench; the command line.
"""
import argparse
import csv
import hashlib
import io
import itertools
import json
import math
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
import warnings
import zipfile
import zlib
from contextlib import nullcontext, suppress
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.datasets.folder import IMG_EXTENSIONS

import metrics
from nets import MODELS

# Per-network defaults of `train`: the recipes of the results in the README. All
# train at 64x64 (48x48 faces upscaled once; 224 costs 9x the time, see `bench`)
# with a OneCycle schedule; VGG11, the slowest per image, runs at the native 48x48
# for 15 epochs to fit a CPU budget. The nets with BatchNorm take SGD + Nesterov
# momentum; AlexNet and VGG11 (no BN) learn much faster with Adam (README, Method).
OURS = {
    "alexnet": dict(image_size=64, batch_size=64, optimizer="adam", lr=1e-4, epochs=20),
    "vgg11": dict(image_size=48, batch_size=64, optimizer="adam", lr=1e-4, epochs=15),
    "resnet34": dict(image_size=64, batch_size=64, optimizer="sgd", lr=0.05, epochs=60),
    "resnet50": dict(image_size=64, batch_size=64, optimizer="sgd", lr=0.05, epochs=40),
    "resnet101": dict(image_size=64, batch_size=64, optimizer="sgd", lr=0.05, epochs=40),
    "googlenet": dict(image_size=64, batch_size=64, optimizer="sgd", lr=0.05, epochs=80),
}
# `--recipe report`: the report's own (REPORT_NOTES): Adam and plain cross-entropy at
# a constant rate, 224x224, RandomResizedCrop(224) (area 0.08-1) and a flip, nothing
# else. Its epochs are chosen on validation here, as ours are, never on the test set.
REPORT_COMMON = dict(image_size=224, optimizer="adam", schedule="constant", weight_decay=0.0,
                     label_smoothing=0.0, crop_scale=0.08, rotation=0.0, erasing=0.0)
REPORT = {
    "alexnet": dict(REPORT_COMMON, lr=2e-4, batch_size=32, epochs=100),
    "vgg11": dict(REPORT_COMMON, lr=1e-4, batch_size=32, epochs=70),
    "resnet34": dict(REPORT_COMMON, lr=1e-4, batch_size=16, epochs=80),
    "googlenet": dict(REPORT_COMMON, lr=3e-4, batch_size=32, epochs=100),
}
REPORT["resnet50"] = REPORT["resnet101"] = REPORT["resnet34"]  # the report trained only ResNet34
# `--recipe short`, for a CPU without native bfloat16 (it trains in float32, 2-6x
# slower): ResNet34 at the faces' own 48 px for 40 epochs, 0.35 of ours' time there but
# 0.533 against 0.566 validation Macro-F1 over three seeds, so not the default
# (RESULTS.md, "A recipe for float32 CPUs"). The other networks train as in ours.
SHORT = dict(OURS, resnet34=dict(OURS["resnet34"], image_size=48, epochs=40))
RECIPES = {"ours": OURS, "report": REPORT, "short": SHORT}
# Defaults of the `train` options that a recipe does not set.
TRAIN_DEFAULTS = dict(schedule="onecycle", weight_decay=5e-4, label_smoothing=0.1, balanced=False, in_channels=3,
                      crop_scale=0.5, rotation=10.0, erasing=0.25, mixup=0.0, ema=None, val_fraction=0.1,
                      split_seed=0, seed=0, pipeline="tensor", skip_bad_images=False, classes=None,
                      watch_test=False)
# Beta(alpha, alpha)'s float32 sampler underflows below an alpha of about 0.005 and then
# draws 0.5, the strongest blend, when a tiny alpha means "almost none": refuse those.
MIXUP_MIN_ALPHA = 0.01

# The report's normalisation: ToTensor() then Normalize(0.5, 0.5), i.e. [-1, 1].
MEAN, STD = 0.5, 0.5
# GoogLeNet's auxiliary losses are weighted 0.3, as in the paper (Szegedy et al. 2015).
AUX_WEIGHT = 0.3
# What `train` and `test` read when no --data is given: what `prepare` writes.
DEFAULT_DATA = "data/fer5"
# What `predict` uses without --checkpoint: GoogLeNet trained on FER2013's faces of the
# five classes (4.8 times fer5's), better on validation than the fer5 checkpoints
# (RESULTS.md, "The users' model"); the report's task keeps checkpoints/resnet34.pt.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "googlenet_fer2013_5class_e30.pt"
# Checkpoint fields every command relies on.
CHECKPOINT_KEYS = ("arch", "classes", "image_size", "in_channels", "state_dict", "args")


class FerError(Exception):
    """A mistake in the user's input: printed as one line, exit status 2."""


def log(*args):
    """Print from one process only (rank 0 under torchrun), unbuffered."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


# ----------------------------------------------------------------------------
# Data: decoded once into a uint8 tensor, augmented per batch on tensors

@dataclass
class Faces:
    """A decoded image folder: images N x C x S x S (uint8), labels N (int64)."""
    images: torch.Tensor
    labels: torch.Tensor
    classes: list
    files: list


def scan_folder(root, only=None):
    """Class names and (file, label) lists of an ImageFolder-style tree.

    Like torchvision's ImageFolder: one sub-folder per class, sorted by name, files
    found recursively; extensions compare case-insensitively, other files are
    ignored (and counted) rather than failing the run. `only` keeps some of the
    class folders (train --classes), so one copy of a data set serves any subset.
    """
    root = Path(root)
    if not root.is_dir():
        raise FerError(f"{root} is not a folder; --data DIR needs DIR/train/<class>/ "
                       "and DIR/test/<class>/ folders of images")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if only:
        unknown = sorted(set(only) - set(classes))
        if unknown:
            raise FerError(f"{root} has no class folder {', '.join(unknown)}; --classes takes some of "
                           f"{', '.join(classes) or 'its class folders (it has none)'}")
        classes = sorted(only)
    if len(classes) < 2:
        raise FerError(f"{root} has {len(classes)} class folder(s); put the images of "
                       "each class (at least two) in a sub-folder named after it")
    files, labels, ignored = [], [], 0
    for label, name in enumerate(classes):
        found = [p for p in sorted((root / name).rglob("*")) if p.is_file()]
        # hidden entries (.ipynb_checkpoints/, macOS ._x.jpg) are not images of the class
        images = [p for p in found if p.suffix.lower() in IMG_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(root / name).parts)]
        ignored += len(found) - len(images)
        if not images:
            raise FerError(f"class folder {root / name} has no images "
                           f"({' '.join(IMG_EXTENSIONS)}); add some or remove the folder")
        files += images
        labels += [label] * len(images)
    if ignored:
        log(f"note: ignored {ignored} hidden or non-image file(s) under {root}")
    return classes, files, labels


def image_transform(size):
    """The one deterministic transform: shorter side to `size`, centre crop, uint8."""
    return T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])


def open_image(path, in_channels):
    """Any image file as a PIL image with 1 (L) or 3 (RGB) channels, upright as its
    camera's EXIF orientation says (a phone's portrait photo is stored on its side)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode == "P":  # palette images may carry transparency: go through RGBA
            img = img.convert("RGBA")
        return img.convert("RGB" if in_channels == 3 else "L")


def read_image(path, size, in_channels):
    return image_transform(size)(open_image(path, in_channels))


def load_faces(root, size, in_channels, skip_bad=False, limit=None, classes=None):
    """Decode every image under `root` (of `classes`, default all) once; later epochs
    never touch a JPEG. `limit` takes an evenly spaced subset (for `bench`)."""
    classes, files, labels = scan_folder(root, classes)
    if limit and limit < len(files):
        keep = torch.linspace(0, len(files) - 1, limit).long().tolist()
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    images, kept, bad = [], [], []
    for path, label in zip(files, labels):
        try:
            images.append(read_image(path, size, in_channels))
            kept.append((path, label))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            if not skip_bad:
                raise FerError(f"cannot read image {path} ({e}); delete it or pass --skip-bad-images")
            bad.append(path)
    if bad:
        log(f"note: skipped {len(bad)} unreadable image(s), first {bad[0]}")
    if not kept:
        raise FerError(f"no readable images under {root}")
    return Faces(torch.stack(images), torch.tensor([label for _, label in kept]),
                 classes, [str(path) for path, _ in kept])


def split_train_val(labels, val_fraction, seed):
    """Indices of a stratified, seeded train / validation split of `labels`.

    Each class gives round(n * val_fraction) of its images (at least one, and never
    all) to validation, so the split keeps the class balance of the training data.
    """
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = min(max(round(len(idx) * val_fraction), 1), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def normalize(images, device):
    """uint8 images -> float in [-1, 1] on `device` (the report's normalisation)."""
    x = images.to(device).float().div_(255)
    return x.sub_(MEAN).div_(STD)


def augment(x, crop_scale, rotation, erasing):
    """Random resized crop, rotation and horizontal flip, then random erasing.

    The first three are one affine warp per image (affine_grid + grid_sample) so a
    whole batch is augmented in two calls on any device; erasing fills a random
    box with 0, mid-grey after normalisation (as RandomErasing's default does).
    """
    n, _, h, w = x.shape
    dev = x.device
    u = lambda lo, hi: torch.empty(n, device=dev).uniform_(lo, hi)  # noqa: E731
    # RandomResizedCrop: area fraction in [crop_scale, 1], aspect ratio in [3/4, 4/3]
    area, ratio = u(crop_scale, 1), u(math.log(3 / 4), math.log(4 / 3)).exp()
    sx, sy = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    tx, ty = u(-1, 1) * (1 - sx), u(-1, 1) * (1 - sy)
    angle = u(-rotation, rotation) * math.pi / 180
    flip = torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos * sx * flip, -sin * sy, tx], 1),
                         torch.stack([sin * sx * flip, cos * sy, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if erasing > 0:
        # RandomErasing's defaults: 2-20% of the area, aspect ratio 0.3-3.3
        area, ratio = u(0.02, 0.2), u(math.log(0.3), math.log(3.3)).exp()
        eh, ew = (area * ratio).sqrt().clamp(max=1) * h, (area / ratio).sqrt().clamp(max=1) * w
        y0, x0 = torch.rand(n, device=dev) * (h - eh), torch.rand(n, device=dev) * (w - ew)
        ys = torch.arange(h, device=dev).view(1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, w)
        box = ((ys >= y0.view(n, 1, 1)) & (ys < (y0 + eh).view(n, 1, 1))
               & (xs >= x0.view(n, 1, 1)) & (xs < (x0 + ew).view(n, 1, 1))
               & (torch.rand(n, 1, 1, device=dev) < erasing))
        x = x.masked_fill(box.unsqueeze(1), 0.0)
    return x


def report_transform(size, in_channels):
    """The report's per-image PIL training pipeline, kept for `--pipeline pil` and `bench`."""
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize((MEAN,) * in_channels, (STD,) * in_channels)])


class FileDataset(torch.utils.data.Dataset):
    """Images read from disk on every access, as ImageFolder does."""

    def __init__(self, files, labels, transform, in_channels):
        self.files, self.labels = files, labels
        self.transform, self.in_channels = transform, in_channels

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(open_image(self.files[i], self.in_channels)), self.labels[i]


def tta_views(x, mode):
    """Test-time views of a batch: itself, plus its mirror (flip), or ten crops.

    tencrop takes the four corners and the centre at 7/8 of the side, resized back
    to the input size (the network was trained at that size), and their mirrors.
    """
    if mode == "none":
        return [x]
    if mode == "flip":
        return [x, x.flip(-1)]
    if mode != "tencrop":  # a typo must not silently become ten crops
        raise FerError(f"unknown test-time augmentation {mode!r}; use none, flip or tencrop")
    h, w = x.shape[-2:]
    ch, cw = round(h * 7 / 8), round(w * 7 / 8)
    top, left = (h - ch) // 2, (w - cw) // 2
    crops = [x[..., :ch, :cw], x[..., :ch, -cw:], x[..., -ch:, :cw], x[..., -ch:, -cw:],
             x[..., top:top + ch, left:left + cw]]
    crops = [F.interpolate(c, size=(h, w), mode="bilinear", align_corners=False) for c in crops]
    return crops + [c.flip(-1) for c in crops]


# ----------------------------------------------------------------------------
# Data: any public form of FER2013 -> the folders above (`prepare`)

# fer2013.csv's emotion codes 0-6, by name; the image-folder copy uses the same names.
FER2013_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
# FER2013's three Usage values and the folder each goes to. PublicTest (the Kaggle
# public leaderboard) goes to a folder that neither `train` nor `test` reads.
USAGE_FOLDERS = {"Training": "train", "PrivateTest": "test", "PublicTest": "publictest"}
CSV_NAMES = ("fer2013.csv", "icml_face_data.csv")  # Kaggle's and the ICML challenge's
ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz")
FACE_SIDE = 48
# The fer5 split, face by face (file, SHA-256, fer2013.csv row): shipped beside fer.py.
MANIFEST = Path(__file__).resolve().parent / "data" / "fer5_manifest.csv"


# FER+'s ten vote columns (Barsoum et al. 2016, in the manifest as ferplus_<name>) and
# the class folder each one means; "unknown" and "NF" (not a face) name no expression.
FERPLUS_CLASSES = {"neutral": "neutral", "happiness": "happy", "surprise": "surprise", "sadness": "sad",
                   "anger": "angry", "disgust": "disgust", "fear": "fear", "contempt": "contempt",
                   "unknown": None, "NF": None}


def ferplus_majority(row):
    """(class, None) when more than half of a manifest row's FER+ votes chose one
    expression, else (None, why). A plurality is not enough: FER+'s own "majority"
    scheme keeps a label only when most of the ten annotators agree on it."""
    try:
        votes = {k: int(row.get(f"ferplus_{k}") or 0) for k in FERPLUS_CLASSES}
    except ValueError:
        raise FerError(f"the manifest's FER+ votes of {row.get('file')} are not whole numbers; "
                       "use the shipped data/fer5_manifest.csv") from None
    top = max(votes, key=votes.get)
    if not any(votes.values()):
        return None, "FER+ has no votes for it"
    if 2 * votes[top] <= sum(votes.values()):
        return None, "no expression has more than half of its FER+ votes"
    if FERPLUS_CLASSES[top] is None:
        return None, f"most FER+ votes say {'not a face' if top == 'NF' else 'unknown'}"
    return FERPLUS_CLASSES[top], None


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


def read_manifest(path):
    """The manifest's rows: split, class, file, sha256, fer2013_row (and FER+ votes)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise FerError(f"cannot read the fer5 manifest {path} ({e.strerror}); it ships with fer.py "
                       "as data/fer5_manifest.csv: restore it (git checkout data/fer5_manifest.csv)") from None
    need = {"split", "class", "file", "sha256", "fer2013_row"}
    if not rows or not need <= set(rows[0]):
        raise FerError(f"the fer5 manifest {path} lacks the columns {', '.join(sorted(need))}; "
                       "restore it (git checkout data/fer5_manifest.csv)")
    return rows


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


# ----------------------------------------------------------------------------
# Runtime: device, mixed precision, processes

@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype = None  # None: float32
    channels_last: bool = False
    rank: int = 0
    world: int = 1

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def precision(self):
        """The name of what training computes in: the autocast dtype, or float32."""
        return str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "float32"


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise FerError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise FerError("--device mps: Apple's MPS backend is not available; use --device cpu or auto")
    return name


def setup_runtime(args, distributed=False):
    """Device, precision and, for `train` under torchrun, the process group."""
    kind = pick_device(args.device)
    world = int(os.environ.get("WORLD_SIZE", 1)) if distributed else 1
    rank = int(os.environ.get("RANK", 0)) if distributed else 0
    if kind == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device(kind)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    if kind == "cpu":
        # Processes sharing a CPU split its cores instead of fighting over them
        # (torchrun also sets OMP_NUM_THREADS; an explicit setting wins).
        env_threads = int(os.environ.get("OMP_NUM_THREADS", 0) or 0)
        torch.set_num_threads(args.threads or env_threads or max(1, (os.cpu_count() or 1) // world))
    amp = args.amp if args.amp is not None else kind in ("cuda", "cpu")
    amp_dtype = None
    if amp:
        if kind == "cuda":
            # emulated bf16 (V100, T4) is slow: those get float16 with the grad scaler
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        elif kind == "cpu" and cpu_has_bf16():
            amp_dtype = torch.bfloat16
        elif kind == "mps":
            amp_dtype = torch.float16
    channels_last = args.channels_last if args.channels_last is not None else kind in ("cuda", "cpu")
    return Runtime(device, amp_dtype, channels_last, rank, world)


# The CPU features that decide training speed, by their /proc/cpuinfo flag: float32
# runs on AVX2 or AVX-512; bfloat16 is faster than float32 only with native bf16
# instructions (AVX512-BF16, or AMX's tiles on recent Xeons), and far slower without.
CPU_FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}


def cpu_flags():
    """The CPU's feature flags, from Linux's /proc/cpuinfo on x86; None where there are
    none to read (other systems; ARM lists `Features` instead)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), None)
    except OSError:
        return None


def cpu_has_bf16():
    return bool({"avx512_bf16", "amx_bf16"} & (cpu_flags() or set()))


def describe_precision(rt, args):
    """The training precision and why it was chosen, and on a CPU the features that
    decide it, for `bench`'s header."""
    chosen = f"{rt.precision} autocast" if rt.amp_dtype else "float32"
    if rt.device.type != "cpu":
        return f"{chosen} ({'--no-amp' if args.amp is False else rt.device.type})"
    if args.amp is False:
        why = "--no-amp"
    else:
        why = "native bfloat16 instructions" if rt.amp_dtype else "no native bfloat16 instructions: it would be slower"
    flags = cpu_flags()
    features = ", ".join(f"{name} {'yes' if f in flags else 'no'}" for f, name in CPU_FEATURES.items()) \
        if flags is not None else "CPU flags unknown (no /proc/cpuinfo)"
    return f"{chosen} ({why}); {features}; PyTorch's CPU kernels: {torch.backends.cpu.get_cpu_capability()}"


def describe_device(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return describe_cpu() if device.type == "cpu" else str(device)


def describe_cpu():
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------
# Models and checkpoints

def build_model(arch, num_classes, in_channels, image_size, rt=None, option="--image-size"):
    model = MODELS[arch](num_classes=num_classes, in_channels=in_channels)
    if image_size < model.min_size:
        raise FerError(f"{option} {image_size} is below {arch}'s minimum of "
                       f"{model.min_size}; use {option} {model.min_size} or more")
    if rt is not None:
        model = model.to(rt.device, memory_format=torch.channels_last if rt.channels_last
                         else torch.preserve_format)
    return model


def check_image_size(arch, image_size, option="--image-size"):
    """build_model's size check before any data is decoded: the network is built on
    the meta device, which allocates and initialises nothing (milliseconds)."""
    with torch.device("meta"):
        build_model(arch, 2, 3, image_size, option=option)


def save_checkpoint(state, path):
    """Atomically (see write_file), so an interrupt or a full disk leaves the
    previous checkpoint intact."""
    write_file(path, lambda f: torch.save(state, f), what="checkpoint ", option="--out")


def weights_only(state):
    """A checkpoint without the optimiser, scheduler, scaler and --ema state that only
    --resume needs: what best.pt and `export` keep."""
    return {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "scaler", "ema")}


HISTORY_COLUMNS = ("epoch", "loss", "val_accuracy", "val_macro_f1", "lr", "seconds")
# history.csv's optional columns: two more with --ema, two more with --watch-test
EXTRA_COLUMNS = ("ema_val_accuracy", "ema_val_macro_f1", "test_accuracy", "test_macro_f1")


def save_run(out, state, best, best_raw=None):
    """After an epoch: last.pt (all that --resume needs), best.pt when validation
    improved (`best`, weights only; else None), best_raw.pt under --ema when the raw
    weights improved (`best_raw`), history.csv and curves.png of the epochs so far."""
    save_checkpoint(state, out / "last.pt")
    if best is not None:
        save_checkpoint(best, out / "best.pt")
    if best_raw is not None:
        save_checkpoint(best_raw, out / "best_raw.pt")
    columns = HISTORY_COLUMNS + tuple(k for k in EXTRA_COLUMNS if k in state["history"][0])
    rows = [",".join(columns)] + [",".join(f"{h[k]:.6g}" if isinstance(h[k], float) else str(h[k])
                                           for k in columns) for h in state["history"]]
    write_file(out / "history.csv", lambda f: f.write(("\n".join(rows) + "\n").encode()), option="--out")
    picture = draw_curves(state["history"], state["best_epoch"])
    write_file(out / "curves.png", lambda f: picture.save(f, format="PNG"), option="--out")


def load_checkpoint(path):
    """A checkpoint dict, loaded safely: weights_only=True refuses pickled code, and
    map_location='cpu' lets a GPU checkpoint load on any machine."""
    path = Path(path)
    if not path.is_file():
        raise FerError(f"checkpoint {path} does not exist; give the .pt file written by `fer.py train`")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for bad files
        text = str(e)
        if "Unsupported global" in text:  # a class or function to call: pickled code, never run
            what = text.split("Unsupported global:", 1)[1].split(" was not", 1)[0].strip()
            raise FerError(f"{path} holds pickled Python code ({what}), which weights_only loading "
                           "refuses for safety, so none of it ran; use a checkpoint written by "
                           "`fer.py train` or `fer.py export`") from None
        # the cause, not torch's advice on weights_only; an empty file raises with no message
        text = text.split("WeightsUnpickler error:", 1)[-1].strip() or "no message"
        reason = ("empty file" if path.stat().st_size == 0
                  else f"{type(e).__name__}: {text.splitlines()[0].split('. ')[0][:200]}")
        raise FerError(f"{path} is not a readable checkpoint, damaged or truncated ({reason}); "
                       "use the .pt file written by `fer.py train` or `fer.py export`") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise FerError(f"{path} is not a fer checkpoint (it lacks {', '.join(missing)}); "
                       "use the .pt file written by `fer.py train` or `fer.py export`")
    if ckpt["arch"] not in MODELS:
        raise FerError(f"{path} holds an unknown network {ckpt['arch']!r}")
    return ckpt


def model_from_checkpoint(ckpt, rt, source="the checkpoint"):
    # normalize() applies this file's MEAN and STD: refuse a checkpoint trained with others.
    if (ckpt.get("mean", MEAN), ckpt.get("std", STD)) != (MEAN, STD):
        raise FerError(f"{source} was trained with mean {ckpt['mean']} and std {ckpt['std']}, "
                       f"this fer.py normalises with {MEAN} and {STD}; use the fer.py that trained it")
    model = build_model(ckpt["arch"], len(ckpt["classes"]), ckpt["in_channels"], ckpt["image_size"], rt)
    # A float16 export loads into the float32 model: load_state_dict casts on copy.
    load_weights(model, ckpt["state_dict"], ckpt["arch"], source)
    return model.eval()


def load_weights(model, state_dict, arch, source):
    """load_state_dict, with a one-line error when the weights do not fit the network."""
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise FerError(f"the weights in {source} do not fit a {arch} network ("
                       f"{' '.join(str(e).split())[:200] or type(e).__name__}); "
                       "the file was changed or not written by `fer.py train`") from None


def check_classes(ckpt, classes, where):
    if list(ckpt["classes"]) != list(classes):
        raise FerError(f"the checkpoint was trained on classes {list(ckpt['classes'])} but "
                       f"{where} has {list(classes)}; use data with the same class folders")


@dataclass
class Member:
    """One checkpoint of what validate, test and predict use: an ensemble, whose
    class probabilities are averaged (a single checkpoint is an ensemble of one)."""
    path: str
    ckpt: dict
    model: nn.Module

    @property
    def input(self):
        """(image size, channels): how its network wants the images decoded."""
        return self.ckpt["image_size"], self.ckpt["in_channels"]


def load_members(paths, rt):
    """The checkpoints of an ensemble and their networks; refused unless all have the
    same classes in the same order, as averaging their probabilities needs."""
    pictures = [p for p in paths if Path(p).suffix.lower() in IMG_EXTENSIONS]
    if pictures:  # `predict a.jpg --checkpoint m.pt b.jpg`: --checkpoint took b.jpg
        raise FerError(f"--checkpoint got the image {pictures[0]}; it takes every path after it, so give "
                       "the images first: fer.py predict faces/ --checkpoint a.pt b.pt")
    ckpts = [load_checkpoint(p) for p in paths]
    for path, ckpt in zip(paths[1:], ckpts[1:]):
        if list(ckpt["classes"]) != list(ckpts[0]["classes"]):
            raise FerError(f"{path} was trained on classes {list(ckpt['classes'])} but {paths[0]} on "
                           f"{list(ckpts[0]['classes'])}; an ensemble averages the probabilities of each class, "
                           "so give checkpoints trained on the same classes in the same order")
    return [Member(str(p), c, model_from_checkpoint(c, rt, p)) for p, c in zip(paths, ckpts)]


def member_inputs(members):
    """The members' distinct (image size, channels), in order: the images are decoded
    once for each."""
    return list(dict.fromkeys(m.input for m in members))


def ensemble_arch(members):
    """The JSON's `arch`: the network of a single checkpoint, "ensemble" for several."""
    return members[0].ckpt["arch"] if len(members) == 1 else "ensemble"


def member_dict(member):
    """A member as the JSON names it: its file and what its network is."""
    c = member.ckpt
    return dict(checkpoint=member.path, arch=c["arch"], epoch=c.get("epoch"), image_size=c["image_size"],
                in_channels=c["in_channels"], weights=c.get("weights", "raw"))


# ----------------------------------------------------------------------------
# The loops: one training epoch, one evaluation used by every command

def compute_loss(out, y, criterion):
    """Cross-entropy; GoogLeNet in training also returns its auxiliary logits."""
    if isinstance(out, tuple):
        main, *aux = out
        return criterion(main, y) + AUX_WEIGHT * sum(criterion(a, y) for a in aux)
    return criterion(out, y)


def mixup(x, y, alpha):
    """Mixup (Zhang et al. 2018): every image blended with a randomly chosen image of
    the same batch, by one weight lam ~ Beta(alpha, alpha). Returns the blend, the
    second images' labels and lam; the loss is blended with the same weight."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(x), device=x.device)
    return lam * x + (1 - lam) * x[perm], y[perm], lam


class Progress:
    """One line inside the epoch (step, images/s, running loss, time left), rewritten
    in place with a carriage return; only on a terminal, so logs and CI get none."""

    def __init__(self, steps, batch_size, stream=None):
        self.stream = stream or sys.stdout
        self.on = self.stream.isatty() and (not dist.is_initialized() or dist.get_rank() == 0)
        self.steps, self.batch_size = steps, batch_size
        self.t0 = self.shown = time.time()
        self.width = 0

    def update(self, step, mean_loss):
        now = time.time()
        if not self.on or (now - self.shown < 0.2 and step < self.steps):  # a few redraws a second
            return
        elapsed, self.shown = now - self.t0, now
        text = (f"  step {step}/{self.steps}  {step * self.batch_size / elapsed:6.0f} img/s  "
                f"loss {mean_loss:.4f}  {elapsed / step * (self.steps - step):4.0f} s left in the epoch")
        self.width = max(self.width, len(text))
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()

    def close(self):
        """Blank the line, so the epoch's own line is printed on a clean one."""
        if self.on and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()


def train_one_epoch(model, batches, steps, optimizer, scheduler, scaler, criterion, rt, epoch, alpha=0.0,
                    progress=None, ema=None, raw_model=None):
    """One pass over the training batches, with mixup when alpha > 0; returns the mean
    loss and the learning rate of the last step (the scheduler has moved on since).
    With --ema, `ema` (an AveragedModel) follows `raw_model`, the network inside any
    DDP or torch.compile wrapper, after every step."""
    model.train()
    total, count, lr = 0.0, 0, optimizer.param_groups[0]["lr"]
    for step, (x, y) in enumerate(batches, 1):
        if alpha > 0:
            x, y2, lam = mixup(x, y, alpha)
        with rt.autocast():
            out = model(rt.prepare(x))
            loss = compute_loss(out, y, criterion)
            # Cross-entropy is linear in the target, so this is the loss of the blended labels
            # (with --balanced too: y2 permutes y, so both terms share one sum of weights).
            if alpha > 0:
                loss = lam * loss + (1 - lam) * compute_loss(out, y2, criterion)
        if not torch.isfinite(loss):
            raise diverged(f"the loss became {loss.item()}", epoch, step, steps, optimizer)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        lr = optimizer.param_groups[0]["lr"]
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update_parameters(raw_model)
        if not isinstance(scheduler, PLATEAU):  # the plateau schedule steps once per epoch, on validation
            scheduler.step()
        total += loss.item()
        count += 1
        if progress:
            progress.update(count, total / count)
    if progress:
        progress.close()
    # A finite last loss can still leave inf/NaN weights: never checkpoint those.
    if not all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()):
        raise diverged("the weights became inf or NaN", epoch, count, steps, optimizer)
    return total / max(count, 1), lr


def diverged(what, epoch, step, steps, optimizer):
    """The error for a loss or weights gone inf/NaN: where, and what to do about it."""
    group = optimizer.param_groups[0]
    peak = group.get("max_lr", group.get("initial_lr", group["lr"]))
    return FerError(f"{what} at epoch {epoch} step {step}/{steps}: training diverged; train again with a "
                    f"lower --lr (this run's peak is {peak:.3g}; try {peak / 10:.3g}); this epoch was not "
                    "saved, so the checkpoints in --out still hold the last good epoch")


@torch.no_grad()
def predict_probs(model, images, rt, batch_size, tta="none"):
    """Softmax probabilities N x C, averaged over the test-time views.

    On a CPU this runs in float32 even when training used bfloat16: evaluation is
    cheap next to training, and float32 gives the same metrics on every CPU.
    """
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = normalize(images[i:i + batch_size], rt.device)
        views = tta_views(x, tta)
        with rt.autocast() if rt.device.type != "cpu" else nullcontext():
            p = sum(F.softmax(model(rt.prepare(v)).float(), 1) for v in views) / len(views)
        out.append(p.cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def ensemble_probs(members, images_by_input, rt, batch_size, tta="none"):
    """The mean of the members' softmax probabilities, each member on the images as
    decoded for it (images_by_input[member.input]) with the same test-time views, and
    each member's own (the mean of one member is its probabilities, unchanged)."""
    each = [predict_probs(m.model, images_by_input[m.input], rt, batch_size, tta) for m in members]
    return torch.stack(each).mean(0), each


def evaluate(model, faces, idx, rt, batch_size):
    """Confusion matrix of `faces[idx]`, training's check after each epoch. Under
    torchrun every process takes a shard and the matrices are summed, so the metrics
    cover the whole split."""
    idx = idx[rt.rank::rt.world]
    probs = predict_probs(model, faces.images[idx], rt, batch_size)
    cm = metrics.confusion_matrix(faces.labels[idx], probs.argmax(1) if len(idx) else idx,
                                  len(faces.classes))
    if rt.world > 1:
        cm = cm.to(rt.device)
        dist.all_reduce(cm)
        cm = cm.cpu()
    return cm


def tensor_batches(faces, idx, batch_size, args, rt, perm_seed):
    """Training batches from the in-memory tensor: the global batch is the same for
    every process, each takes its rank's share (DistributedSampler's job)."""
    perm = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(perm_seed))]
    steps = max(len(perm) // batch_size, 1)  # drop the last partial batch (BatchNorm)
    for s in range(steps):
        b = perm[s * batch_size:(s + 1) * batch_size][rt.rank::rt.world]
        x = augment(normalize(faces.images[b], rt.device), args.crop_scale, args.rotation, args.erasing)
        yield x, faces.labels[b].to(rt.device)


def pil_batches(faces, idx, batch_size, args, rt, perm_seed):
    """The report's pipeline: every image re-read and transformed by PIL, per epoch."""
    files = [faces.files[i] for i in idx]
    data = FileDataset(files, faces.labels[idx].tolist(), report_transform(args.image_size, args.in_channels), args.in_channels)
    if rt.world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(data, seed=perm_seed, drop_last=True)
    else:
        sampler = torch.utils.data.RandomSampler(data, generator=torch.Generator().manual_seed(perm_seed))
    loader = torch.utils.data.DataLoader(data, batch_size // rt.world, sampler=sampler, drop_last=True,
                                         num_workers=args.workers)
    steps = max(len(idx) // batch_size, 1)  # as many as tensor_batches: the schedule counts on it
    for x, y in itertools.islice(loader, steps):
        yield x.to(rt.device), y.to(rt.device)


def make_optimizer(model, name, lr, weight_decay):
    """The recipe's optimiser, fused (one kernel over all parameters) on CPUs and GPUs:
    the same update, but AlexNet's step with Adam took 0.68 s in the default
    per-tensor loops on one CPU thread and 0.06 s fused (RESULTS.md, Speed)."""
    params = list(model.parameters())
    fused = dict(fused=True) if params and params[0].device.type in ("cpu", "cuda") else {}
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay, **fused)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fused)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **fused)


# --schedule plateau halves the rate once 6 epochs in a row bring no new best
# validation Macro-F1 (torch cuts when the count exceeds the patience): on fer5's 500
# validation faces the figure moves by about 0.02 from one epoch to the next mid-run
# (epochs 21-45 of ResNet34's 60-epoch runs with Adam, batch 32 and no label
# smoothing), so a shorter patience would cut on noise.
PLATEAU = torch.optim.lr_scheduler.ReduceLROnPlateau
PLATEAU_FACTOR, PLATEAU_PATIENCE = 0.5, 5


def make_scheduler(args, optimizer, total_steps):
    """Learning-rate schedule: onecycle (warm-up then cosine down), cosine or constant,
    stepped per batch; or plateau, stepped per epoch on validation Macro-F1."""
    if args.schedule == "plateau":
        for group in optimizer.param_groups:  # the other schedulers record it; `diverged` reports it
            group.setdefault("initial_lr", args.lr)
        # threshold 0: any rise is a new best, as for best.pt
        return PLATEAU(optimizer, mode="max", factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE, threshold=0)
    if args.schedule == "onecycle":
        # OneCycleLR's warm-up ends at step pct_start * total_steps - 1: at least step 1, so
        # a short run still starts low, reaches the peak, then decays (under 3 steps it cannot).
        if total_steps < 3:
            raise FerError(f"--schedule onecycle needs at least 3 steps (warm up, peak, decay), this run has "
                           f"{total_steps}: train more --epochs, lower --batch-size, or use --schedule constant")
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total_steps,
                                                   pct_start=max(0.2, 2 / total_steps))
    if args.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total_steps, 1))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def class_weights(labels, num_classes):
    """Inverse-frequency weights (mean 1) for --balanced: each class counts equally."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    return counts.sum() / (num_classes * counts)


# ----------------------------------------------------------------------------
# Commands: prepare, train, validate, test

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
    log(f"prepared {src} ({'CSV' if source[0] == 'csv' else 'image folders'}) in {time.time() - t0:.0f} s:")
    for d in ("fer5", "fer2013"):
        for split, per_class in counts[d].items():
            log(f"  {str(out / d / split) + ':':<{len(str(out)) + 20}} {sum(per_class.values()):6,d} faces  "
                + "  ".join(f"{c} {n:,d}" for c, n in per_class.items()))
    if "publictest" in counts["fer2013"]:
        log(f"  {out / 'fer2013' / 'publictest'} holds FER2013's PublicTest faces; no command reads it by default")
    for why, n in skipped.items():
        log(f"  left out: {n} {why}")


TRAIN_OPTIONS = ("model", "recipe", "epochs", "batch_size", "lr", "optimizer", "schedule", "weight_decay",
                 "label_smoothing", "balanced", "image_size", "in_channels", "crop_scale", "rotation",
                 "erasing", "mixup", "ema", "val_fraction", "split_seed", "seed", "pipeline", "skip_bad_images",
                 "classes", "watch_test")
# What a checkpoint's `args` records: the training options and where the run read and wrote.
RUN_OPTIONS = TRAIN_OPTIONS + ("data", "out", "amp", "channels_last")
# The training options of runs saved before the option existed: what those runs did.
OLDER_RUNS = dict(mixup=0.0, recipe="ours", ema=None, classes=None, watch_test=False)
# What `--resume` needs beyond CHECKPOINT_KEYS (best.pt and exports drop the first three).
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "epoch", "best_metric", "best_epoch", "history")


def resolve_train_args(args):
    """Fill the network's recipe into the options the user left out; on --resume
    take every training option from the checkpoint instead, so the run continues
    exactly as it started."""
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        if args.model and args.model != ckpt["arch"]:
            raise FerError(f"--resume {args.resume} is a {ckpt['arch']} checkpoint but --model is "
                           f"{args.model}; drop --model or resume a {args.model} checkpoint")
        for k, v in OLDER_RUNS.items():
            ckpt["args"].setdefault(k, v)
        ckpt["args"]["split_seed"] = run_split_seed(ckpt["args"])
        missing = [k for k in RESUME_KEYS if k not in ckpt] + [k for k in TRAIN_OPTIONS if k not in ckpt["args"]]
        missing += ["ema"] if ckpt["args"]["ema"] and "ema" not in ckpt else []
        if missing:
            raise FerError(f"--resume {args.resume} has no training state ({', '.join(missing)}); "
                           "best.pt and exports keep the weights only: resume from the run's last.pt, or train anew")
        given = [k for k in TRAIN_OPTIONS if k != "model" and getattr(args, k) is not None]
        if given:
            raise FerError(f"--resume continues a run with the options it was started with; drop "
                           f"{', '.join('--' + k.replace('_', '-') for k in given)} (or start a new run "
                           "with other options)")
        for k in TRAIN_OPTIONS:
            setattr(args, k, ckpt["args"][k])
        for k in ("amp", "channels_last"):  # they change the numerics: keep them unless told
            if getattr(args, k) is None:
                setattr(args, k, ckpt["args"].get(k))
        args.data = args.data or ckpt["args"]["data"]
        args.out = args.out or ckpt["args"]["out"]
    args.model = args.model or "resnet34"
    args.recipe = args.recipe or "ours"
    for k, v in {**TRAIN_DEFAULTS, **RECIPES[args.recipe][args.model]}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.out = args.out or str(Path("runs") / args.model)
    args.data = args.data or DEFAULT_DATA
    return ckpt


def training_data(args, ckpt, rt):
    """The decoded training folder and its train / validation indices."""
    train_dir = split_folder(args.data, "train")
    out = Path(args.out)
    make_folder(out, "--out")
    if not os.access(out, os.W_OK):
        raise FerError(f"--out folder {out} is not writable; choose another --out")
    t0 = time.time()
    faces = load_faces(train_dir, args.image_size, args.in_channels, args.skip_bad_images, classes=args.classes)
    if ckpt is not None:
        check_classes(ckpt, faces.classes, train_dir)
    train_idx, val_idx = split_train_val(faces.labels, args.val_fraction, args.split_seed)
    log(f"{args.model}: {len(train_idx)} training and {len(val_idx)} validation images of "
        f"{len(faces.classes)} classes ({', '.join(faces.classes)}), decoded in {time.time() - t0:.1f} s "
        f"on {rt.device} ({describe_device(rt.device)})"
        f"{', ' + rt.precision + ' autocast' if rt.amp_dtype else ''}"
        f"{', ' + str(rt.world) + ' processes' if rt.world > 1 else ''}")
    return faces, train_idx, val_idx


def watched_test(args, classes):
    """--watch-test: DATA/test, decoded as the training faces are, or None. Scored after
    every epoch and only written down: it measures what choosing the epoch on the test
    set, as the report did, would give; nothing in training reads its figures."""
    if not args.watch_test:
        return None
    test_dir = split_folder(args.data, "test")
    faces = load_faces(test_dir, args.image_size, args.in_channels, args.skip_bad_images, classes=args.classes)
    if faces.classes != classes:
        raise FerError(f"--watch-test: {test_dir} has classes {faces.classes} but the training folder "
                       f"{classes}; give --data with the same class folders in train/ and test/")
    log(f"--watch-test: {len(faces.labels)} test images scored after every epoch, never used to choose")
    return faces


def training_setup(args, faces, train_idx, rt):
    """The network (wrapped for DDP and compiled when asked), its optimiser, schedule,
    grad scaler and loss, and the number of steps an epoch."""
    torch.manual_seed(args.seed)
    raw_model = build_model(args.model, len(faces.classes), args.in_channels, args.image_size, rt)
    model = raw_model  # raw_model, unwrapped, is what checkpoints hold
    if rt.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[rt.device] if rt.device.type == "cuda" else None)
    if args.compile:  # after DDP, so compiled graphs keep DDP's bucketed all-reduce
        model = torch.compile(model)
    if args.batch_size % rt.world:
        raise FerError(f"--batch-size {args.batch_size} does not split evenly over {rt.world} processes; "
                       f"use a multiple of {rt.world}")
    steps = max(len(train_idx) // args.batch_size, 1)
    optimizer = make_optimizer(raw_model, args.optimizer, args.lr, args.weight_decay)
    scheduler = make_scheduler(args, optimizer, steps * args.epochs)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    weight = class_weights(faces.labels[train_idx], len(faces.classes)).to(rt.device) if args.balanced else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=args.label_smoothing)
    return model, raw_model, optimizer, scheduler, scaler, criterion, steps


def make_ema(raw_model, decay):
    """--ema: an exponential moving average of the weights, or None. use_buffers averages
    BatchNorm's running statistics too, so the averaged network is evaluated with
    statistics that match its own weights, not the raw network's latest."""
    if decay is None:
        return None
    return AveragedModel(raw_model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def restore(ckpt, args, raw_model, optimizer, scheduler, scaler, ema):
    """--resume: the saved weights and optimiser, schedule, scaler and --ema states
    (the average's state_dict holds its step count, n_averaged); returns the epoch to
    continue after, the best figure so far, its epoch and the history."""
    load_weights(raw_model, ckpt["state_dict"], ckpt["arch"], args.resume)
    for part, name in ((optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler"), (ema, "ema")):
        if part is not None:
            part.load_state_dict(ckpt[name])
    log(f"resuming from {args.resume} after epoch {ckpt['epoch']} of {args.epochs}")
    return ckpt["epoch"], ckpt["best_metric"], ckpt["best_epoch"], ckpt["history"]


def validate_epoch(raw_model, ema, faces, val_idx, rt, batch_size):
    """Validation metrics of the raw weights and, with --ema, of the averaged ones (else None)."""
    m = metrics.classification_metrics(evaluate(raw_model, faces, val_idx, rt, batch_size))
    if ema is None:
        return m, None
    return m, metrics.classification_metrics(evaluate(ema.module, faces, val_idx, rt, batch_size))


def epoch_summary(epoch, epochs, loss, m, ema_m, test_m, seconds, lr, images, improved):
    """An epoch's row of the history, logged as one line; --watch-test's figures
    (test_m, else None) come last, after a bar, apart from what chooses the epoch."""
    row = dict(epoch=epoch, loss=loss, val_accuracy=m["accuracy"],
               val_macro_f1=m["macro_f1"], seconds=seconds, lr=lr)
    ema_text = test_text = ""
    if ema_m is not None:
        row.update(ema_val_accuracy=ema_m["accuracy"], ema_val_macro_f1=ema_m["macro_f1"])
        ema_text = f"ema acc {ema_m['accuracy']:.4f}  ema macro-F1 {ema_m['macro_f1']:.4f}  "
    if test_m is not None:
        row.update(test_accuracy=test_m["accuracy"], test_macro_f1=test_m["macro_f1"])
        test_text = f"  | watched, not used: test acc {test_m['accuracy']:.4f}  test macro-F1 {test_m['macro_f1']:.4f}"
    log(f"epoch {epoch:3d}/{epochs}  loss {loss:.4f}  val acc {m['accuracy']:.4f}  val macro-F1 {m['macro_f1']:.4f}  "
        f"{ema_text}{images / seconds:6.0f} img/s  {seconds:5.1f} s  lr {lr:.2e}{'  *' if improved else ''}{test_text}")
    return row


def best_checkpoint(state, ema, ema_m):
    """What best.pt keeps: the weights only, the averaged ones (`weights: "ema"`) when
    they validated better than the raw ones; a plain checkpoint either way."""
    if ema is None or ema_m["macro_f1"] <= state["val_metrics"]["macro_f1"]:
        return weights_only(state)
    return dict(weights_only(state), state_dict=ema.module.state_dict(), weights="ema", val_metrics=ema_m)


def best_raw_checkpoint(state):
    """--ema's best_raw.pt: the raw weights of an epoch that beat every raw one before,
    with their own figure and epoch. The average never feeds back into training, so
    the raw weights follow the run without --ema step for step (on a CPU; a GPU's
    kernels are not bit-exact run to run): this is what that run's best.pt would be."""
    m = state["val_metrics"]
    return dict(weights_only(state), best_metric=m["macro_f1"], best_epoch=state["epoch"])


def cmd_train(args):
    ckpt = resolve_train_args(args)
    check_image_size(args.model, args.image_size)
    rt = setup_runtime(args, distributed=True)
    t0 = time.time()
    faces, train_idx, val_idx = training_data(args, ckpt, rt)
    test_faces = watched_test(args, faces.classes)
    model, raw_model, optimizer, scheduler, scaler, criterion, steps = training_setup(args, faces, train_idx, rt)
    ema = make_ema(raw_model, args.ema)  # of the raw network: DDP and compile wrap the same weights
    start, best, best_epoch, history = 0, -1.0, 0, []
    if ckpt is not None:
        start, best, best_epoch, history = restore(ckpt, args, raw_model, optimizer, scheduler, scaler, ema)
    batches = pil_batches if args.pipeline == "pil" else tensor_batches

    for epoch in range(start + 1, args.epochs + 1):
        # Seeded per epoch (and per process), so --resume replays the same epochs.
        torch.manual_seed(args.seed * 100_003 + epoch * 101 + rt.rank)
        tic = time.time()
        loss, lr = train_one_epoch(model, batches(faces, train_idx, args.batch_size, args, rt, args.seed + epoch),
                                   steps, optimizer, scheduler, scaler, criterion, rt, epoch, args.mixup,
                                   Progress(steps, args.batch_size), ema, raw_model)
        seconds = time.time() - tic
        if rt.world > 1:  # BatchNorm statistics drift apart per process: validate rank 0's
            for b in itertools.chain(raw_model.buffers(), ema.buffers() if ema is not None else ()):
                dist.broadcast(b, 0)
        m, ema_m = validate_epoch(raw_model, ema, faces, val_idx, rt, args.batch_size * 2)
        if isinstance(scheduler, PLATEAU):
            # the raw weights' figure (the rate trains them; an average only follows), and
            # every process sees the same one, so the rates stay equal
            scheduler.step(m["macro_f1"])
        kept = max(m["macro_f1"], ema_m["macro_f1"] if ema is not None else -1.0)  # best.pt keeps the better
        improved = kept > best
        raw_improved = ema is not None and m["macro_f1"] > max((h["val_macro_f1"] for h in history), default=-1.0)
        if improved:
            best, best_epoch = kept, epoch
        test_m = None if test_faces is None else metrics.classification_metrics(
            evaluate(raw_model, test_faces, torch.arange(len(test_faces.labels)), rt, args.batch_size * 2))
        history.append(epoch_summary(epoch, args.epochs, loss, m, ema_m, test_m, seconds, lr,
                                     steps * args.batch_size, improved))
        if rt.rank == 0:
            state = dict(arch=args.model, classes=faces.classes, image_size=args.image_size,
                         in_channels=args.in_channels, mean=MEAN, std=STD, epoch=epoch,
                         state_dict=raw_model.state_dict(), weights="raw", optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                         best_metric=best, best_epoch=best_epoch, val_metrics=m, history=history,
                         args={k: getattr(args, k) for k in RUN_OPTIONS})
            if ema is not None:
                state["ema"] = ema.state_dict()
            save_run(Path(args.out), state, best_checkpoint(state, ema, ema_m) if improved else None,
                     best_raw_checkpoint(state) if raw_improved else None)
        if args.dry_run:
            break
    raw = ", best_raw.pt" if (Path(args.out) / "best_raw.pt").exists() else ""
    log(f"best validation macro-F1 {best:.4f} at epoch {best_epoch}; checkpoints in {args.out}/ "
        f"(best.pt{raw}, last.pt); {(time.time() - t0) / 60:.1f} min in all")


def evaluation_setup(args):
    """validate's, test's and predict's runtime and the members of --checkpoint."""
    rt = setup_runtime(args)
    return rt, load_members(args.checkpoint, rt)


def decode_for(members, folder, skip_bad):
    """FOLDER's images decoded once for each distinct input of the members, checked
    against their classes: {(size, channels): Faces}. Only the class folders the
    members trained on are read (train --classes), so a larger folder serves too."""
    classes = members[0].ckpt["args"].get("classes")  # None (all) before --classes existed
    faces = {key: load_faces(folder, *key, skip_bad, classes=classes) for key in member_inputs(members)}
    check_classes(members[0].ckpt, next(iter(faces.values())).classes, folder)
    return faces


def evaluate_members(members, faces_by_input, idx, rt, batch_size, tta):
    """validate's and test's evaluation of faces[idx]: the ensemble's probabilities and
    each member's."""
    return ensemble_probs(members, {k: f.images[idx] for k, f in faces_by_input.items()}, rt, batch_size, tta)


def confusions(labels, probs, each, num_classes):
    """The ensemble's confusion matrix and each member's."""
    cms = [metrics.confusion_matrix(labels, p.argmax(1), num_classes) for p in (probs, *each)]
    return cms[0], cms[1:]


def describe(members):
    """What validate and test score: a network and its epoch, or an ensemble."""
    c = members[0].ckpt
    return f"{c['arch']} (epoch {c.get('epoch')})" if len(members) == 1 else f"an ensemble of {len(members)}"


def log_report(members, member_cms, m, cm, classes):
    """validate's and test's printout: with several checkpoints a line per member (its
    file, network and own figures), then the report and the confusion matrix."""
    if len(members) > 1:
        for member, member_cm in zip(members, member_cms):
            mm, c = metrics.classification_metrics(member_cm), member.ckpt
            log(f"  {member.path}: {c['arch']} epoch {c.get('epoch')}, {c['image_size']} px"
                f"{', EMA weights' if c.get('weights') == 'ema' else ''}: "
                f"accuracy {mm['accuracy']:.4f}  macro-F1 {mm['macro_f1']:.4f}")
    log(metrics.format_report(m, classes))
    log(metrics.format_confusion_matrix(cm, classes))


def split_folder(data, split):
    """DATA/SPLIT, which must be a folder; the default DATA is written by `prepare`."""
    folder = Path(data) / split
    if not folder.is_dir():
        hint = (f"; `python fer.py prepare FER2013-DOWNLOAD` writes {DEFAULT_DATA}, or give --data DIR"
                if data == DEFAULT_DATA else "")
        raise FerError(f"{folder} not found; --data DIR must hold DIR/{split}/<class>/ image folders{hint}")
    return folder


def run_split_seed(run_args):
    """The seed of a run's validation split, from its checkpoint's args: --split-seed,
    or --seed for runs saved before --split-seed existed (--seed moved the split then)."""
    return run_args.get("split_seed", run_args.get("seed"))


def validation_split(members, data):
    """The folder, fraction and seed of the validation split the members were trained
    with, and whether to skip bad images: one split for all, or the ensemble would be
    scored on faces some member trained on. --data DATA replaces the folder."""
    def split(m):
        a = m.ckpt["args"]
        return str(Path(data or a["data"]).resolve()), a["val_fraction"], run_split_seed(a)
    for m in members[1:]:
        if split(m) != split(members[0]):
            (d0, f0, s0), (d, f, s) = split(members[0]), split(m)
            raise FerError(f"{members[0].path} holds out {f0} of {d0} with split seed {s0} for validation but "
                           f"{m.path} {f} of {d} with split seed {s}; an ensemble is validated on one split none "
                           "of its members trained on: give checkpoints trained with the same --data, "
                           "--val-fraction and --split-seed")
    a = members[0].ckpt["args"]
    skip_bad = any(m.ckpt["args"]["skip_bad_images"] for m in members)
    return data or a["data"], a["val_fraction"], run_split_seed(a), skip_bad


def cmd_validate(args):
    """Metrics on the validation split the run used, rebuilt from the checkpoint(s)."""
    rt, members = evaluation_setup(args)
    data, val_fraction, seed, skip_bad = validation_split(members, args.data)
    train_dir = split_folder(data, "train")
    faces_by_input = decode_for(members, train_dir, skip_bad)
    faces = faces_by_input[members[0].input]
    _, val_idx = split_train_val(faces.labels, val_fraction, seed)
    probs, each = evaluate_members(members, faces_by_input, val_idx, rt, args.batch_size, args.tta)
    cm, member_cms = confusions(faces.labels[val_idx], probs, each, len(faces.classes))
    m = metrics.classification_metrics(cm)
    log(f"validation split of {train_dir}: {len(val_idx)} images (seed {seed}, fraction {val_fraction}), "
        f"{describe(members)}, tta {args.tta}")
    log_report(members, member_cms, m, cm, faces.classes)
    write_json(args.json, results_dict(members, faces.classes, m, cm, args.tta, member_cms))
    return m


def metrics_dict(classes, m, cm):
    per_class = {c: dict(precision=m["precision"][i], recall=m["recall"][i], f1=m["f1"][i],
                         support=m["support"][i]) for i, c in enumerate(classes)}
    return dict(accuracy=m["accuracy"], macro_f1=m["macro_f1"], per_class=per_class, confusion_matrix=cm.tolist())


def results_dict(members, classes, m, cm, tta, member_cms):
    """validate's and test's JSON: the ensemble's metrics (one checkpoint's, for one),
    then each member's file, network and own metrics."""
    return dict(arch=ensemble_arch(members), tta=tta, classes=list(classes), **metrics_dict(classes, m, cm),
                members=[dict(member_dict(member), **metrics_dict(classes, metrics.classification_metrics(c), c))
                         for member, c in zip(members, member_cms)])


def write_json(path, obj):
    if path:
        write_file(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_file(path, write, what="", option="path"):
    """`write(f)` into a temporary file renamed over `path`, so a full disk or an
    interrupt leaves an earlier `path` intact. Through a Python file, so a full disk
    raises OSError(ENOSPC) rather than torch's zip-writer RuntimeError; fsync before
    the rename, so the new file is complete on disk."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise FerError(f"cannot write {what}{path} ({reason}); free disk space or choose another {option}") from None
    finally:
        with suppress(OSError):  # e.g. its folder is gone or is a file: then there is no tmp
            tmp.unlink(missing_ok=True)


def make_folder(path, option):
    """mkdir -p, with a one-line error naming the option that chose the folder."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = "a file has that name" if isinstance(e, FileExistsError) else e.strerror
        raise FerError(f"cannot create {option} folder {path} ({reason}); choose another {option}") from None


def ferplus_rescore(faces, probs, manifest):
    """`test --labels ferplus`: the faces the manifest gives a clear FER+ majority of
    the checkpoint's classes, relabelled with it, and their probabilities. Logs the
    faces left out and why, and how many of the model's mistakes against FER2013's
    labels are faces where the crowd chose the model's answer. Returns the relabelled
    faces, the mask of the kept ones and the figures for the JSON."""
    # By FER2013's label and file name without extension (`prepare` writes PNGs from a CSV)
    rows = {(m["class"], Path(m["file"]).stem): m for m in read_manifest(manifest)}
    if "ferplus_neutral" not in next(iter(rows.values())):
        raise FerError(f"the manifest {manifest} has no FER+ votes (ferplus_* columns); "
                       "use the shipped data/fer5_manifest.csv")
    labels, left_out = torch.full_like(faces.labels, -1), {}
    for i, f in enumerate(faces.files):
        row = rows.get((faces.classes[faces.labels[i]], Path(f).stem))
        label, why = ferplus_majority(row) if row else (None, "not in the manifest")
        if label is not None and label not in faces.classes:
            label, why = None, "the FER+ majority is a class the checkpoint lacks"
        if label is None:
            left_out[why] = left_out.get(why, 0) + 1
        else:
            labels[i] = faces.classes.index(label)
    keep = labels >= 0
    if not keep.any():
        raise FerError(f"none of the {len(labels)} test faces has a clear FER+ majority in {manifest} "
                       "(faces are matched by class and file name); --labels ferplus needs fer5's or FER2013's test faces")
    pred = probs.argmax(1)
    wrong = pred != faces.labels
    sided = int((wrong & (pred == labels)).sum())
    fer2013_accuracy = float((~wrong[keep]).float().mean())  # on the same faces, for comparison
    log(f"labels: the FER+ majority, for {int(keep.sum())} of {len(labels)} faces; left out: "
        + ("; ".join(f"{n} ({why})" for why, n in left_out.items()) or "none"))
    log(f"against FER2013's labels: accuracy {fer2013_accuracy:.4f} on these {int(keep.sum())} faces; "
        f"{int(wrong.sum())} mistakes on all {len(labels)}, on {sided} of which the FER+ majority chose "
        "the model's answer")
    extra = dict(labels="ferplus", faces_scored=int(keep.sum()), left_out=left_out,
                 fer2013_accuracy_on_scored=fer2013_accuracy, fer2013_label_mistakes=int(wrong.sum()),
                 mistakes_where_ferplus_agrees_with_model=sided)
    scored = replace(faces, images=faces.images[keep], labels=labels[keep],
                     files=[f for f, k in zip(faces.files, keep) if k])
    return scored, keep, extra


def cmd_test(args):
    """The full metrics report on DIR/test: the only command that reads it."""
    rt, members = evaluation_setup(args)
    test_dir = split_folder(args.data, "test")
    faces_by_input = decode_for(members, test_dir, args.skip_bad_images)
    faces = faces_by_input[members[0].input]
    probs, each = evaluate_members(members, faces_by_input, torch.arange(len(faces.labels)), rt,
                                   args.batch_size, args.tta)
    log(f"{describe(members)} on {test_dir}: {len(faces.labels)} images, tta {args.tta}")
    extra = dict(labels="fer2013")
    if args.labels == "ferplus":
        faces, keep, extra = ferplus_rescore(faces, probs, args.manifest)
        probs, each = probs[keep], [p[keep] for p in each]
    cm, member_cms = confusions(faces.labels, probs, each, len(faces.classes))
    m = metrics.classification_metrics(cm)
    log_report(members, member_cms, m, cm, faces.classes)
    results = {**results_dict(members, faces.classes, m, cm, args.tta, member_cms), **extra}
    write_json(args.json, results)
    if args.save_dir:
        save_dir = Path(args.save_dir)
        make_folder(save_dir, "--save-dir")
        write_json(save_dir / "metrics.json", results)
        picture = draw_confusion_matrix(cm, faces.classes)
        write_file(save_dir / "confusion_matrix.png", lambda f: picture.save(f, format="PNG"))
        picture = draw_mistakes(faces, probs, args.mistakes)
        write_file(save_dir / "mistakes.png", lambda f: picture.save(f, format="PNG"))
        log(f"wrote {save_dir}/metrics.json, confusion_matrix.png and mistakes.png")
    return m


# ----------------------------------------------------------------------------
# Using a trained model: predict, pictures, export

def find_images(paths):
    """Image files of PATHs in order, each once; folders searched recursively."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            # Hidden entries (.ipynb_checkpoints/, macOS ._face.jpg) are not faces.
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise FerError(f"folder {p} has no images ({' '.join(IMG_EXTENSIONS)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FerError(f"{p} does not exist; give image files or folders of images")
    return list(dict.fromkeys(files))  # a file given twice (or inside a given folder too) is one row


# Faces in photos: an optional extra, so that the core needs torch and torchvision only.
# OpenCV 4.x ships its Haar face cascades inside the wheel, so nothing is downloaded at
# run time (5.0 no longer ships them, and its FaceDetectorYN needs a model file that is
# not in the wheel). Of its four frontal-face cascades, alt found as many fer5 faces
# pasted into photos as the best (default, alt2) with about a third fewer false boxes
# (RESULTS.md, Faces in photos).
DETECTOR_INSTALL = 'pip install "opencv-python-headless<5"'
CASCADE = "haarcascade_frontalface_alt.xml"
# FER2013's crops are a little wider than the box alt finds on them: on fer5 faces
# pasted into photos at 160 px, the crop's side was a median 1.05 times the box's.
FACE_MARGIN = 1.05
# A picture is taken for a face crop (and classified whole) when it is no longer than
# this on its longer side and no further from square than this ratio of its sides.
CROP_MAX_SIDE, CROP_MAX_ASPECT = 256, 1.5


def note(message):
    """A remark on predict's input: on stderr, so stdout keeps only the table."""
    print(f"note: {message}", file=sys.stderr, flush=True)


def face_detector(detect):
    """OpenCV's frontal-face cascade, or None to classify whole pictures: with
    --no-detect, or without OpenCV when --detect was not asked for."""
    if detect is False:
        return None
    try:
        import cv2  # the optional extra: imported here only, so fer.py runs without it
        path = os.path.join(cv2.data.haarcascades, CASCADE)
    except (ImportError, AttributeError):  # AttributeError: an OpenCV without its cascades
        path = None
    cascade = cv2.CascadeClassifier(path) if path and os.path.isfile(path) else None
    if cascade is None or cascade.empty():  # no OpenCV, or 5.x, which dropped the cascades
        if detect:
            raise FerError(f"--detect needs the face cascades of OpenCV 4, which are not installed; "
                           f"{DETECTOR_INSTALL}, or leave out --detect to classify whole pictures")
        return None
    return cascade


def find_faces(cascade, photo):
    """Boxes (left, top, width, height) of the frontal faces in a PIL photo."""
    import numpy as np  # comes with OpenCV, which takes arrays
    gray = np.asarray(photo.convert("L"))
    # minSize: a face under 32 px holds too little for networks trained on 48 px faces
    boxes = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(32, 32))
    return sorted(tuple(int(v) for v in box) for box in boxes)  # left to right


def crop_face(photo, box, size, in_channels):
    """The face cut out as FER2013's faces were: a square FACE_MARGIN times the box
    around its centre (black beyond the photo's edge), grayscale, resized."""
    x, y, w, h = box
    cx, cy, half = x + w / 2, y + h / 2, FACE_MARGIN * max(w, h) / 2
    square = photo.crop(tuple(round(v) for v in (cx - half, cy - half, cx + half, cy + half)))
    return image_transform(size)(square.convert("L").convert("RGB" if in_channels == 3 else "L"))


def looks_cropped(size):
    """Whether a picture of `size` (width, height) passes for a face crop."""
    w, h = size
    return max(w, h) <= CROP_MAX_SIDE and max(w, h) <= CROP_MAX_ASPECT * min(w, h)


def faces_to_classify(path, cascade, detect):
    """The picture at `path` and the boxes predict classifies in it: each face the
    detector finds, or [None], the whole picture, when detection is off or, without
    --detect, when the picture looks like a face crop (then the picture is not opened)."""
    with Image.open(path) as img:  # reads the header only
        w, h = img.size
    search = not looks_cropped((w, h)) if detect is None else detect
    if not search or cascade is None:  # (--detect without OpenCV stopped in face_detector)
        if search:
            note(f"{path} is {w}x{h}, not a face crop: the network expects a cropped face, as in FER2013; "
                 f"{DETECTOR_INSTALL} to find the faces first")
        return None, [None]
    photo = open_image(path, 3)
    return photo, find_faces(cascade, photo)


def face_image(path, photo, box, size, in_channels):
    """One face (or the whole picture, box None) decoded for one input of the members."""
    return read_image(path, size, in_channels) if box is None else crop_face(photo, box, size, in_channels)


def read_faces(files, cascade, detect, inputs):
    """(file, box) of every face predict classifies, and their images decoded for each
    input of the members: {(size, channels): N x C x S x S uint8}."""
    faces, images = [], {key: [] for key in inputs}
    for f in files:
        try:
            photo, boxes = faces_to_classify(f, cascade, detect)
            for key in images:
                images[key] += [face_image(f, photo, box, *key) for box in boxes]
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise FerError(f"cannot read image {f} ({e}); remove it or give only image files") from None
        faces += [(f, box) for box in boxes]
    check_faces_found(files, faces)
    return faces, {key: torch.stack(v) for key, v in images.items()}


def check_faces_found(files, faces):
    """Say which pictures had no face; refuse to go on when none had one."""
    found = {f for f, _ in faces}
    faceless = [f for f in files if f not in found]
    hint = "give photos of frontal faces, or pass --no-detect to classify whole pictures"
    if not faces:
        where = faceless[0] if len(faceless) == 1 else f"any of the {len(faceless)} pictures"
        raise FerError(f"no face found in {where}; {hint}")
    for f in faceless:
        note(f"no face found in {f}, so it is not classified; {hint}")


def box_text(box):
    return ",".join(map(str, box)) if box else "-"


def prediction_rows(faces, probs, classes, top):
    """predict's result per face: file, box, top class, the `top` best and every class."""
    results = []
    for (f, box), p in zip(faces, probs):
        best = p.topk(min(top, len(classes)))
        results.append(dict(file=str(f), box=box, prediction=classes[best.indices[0]],
                            top=[dict(label=classes[i], probability=round(float(v), 4))
                                 for v, i in zip(best.values, best.indices)],
                            probabilities={c: round(float(v), 4) for c, v in zip(classes, p)}))
    return results


def log_prediction_table(results, classes):
    """One row per face: file, (with detection) its box, predicted class, probabilities."""
    # After the file, with detection, the face's box (- for a picture classified whole).
    heads = ("file", "box") if any(r["box"] for r in results) else ("file",)
    lead = [(r["file"], box_text(r["box"]))[:len(heads)] for r in results]
    lead_w = [max(len(h), *(len(cells[i]) for cells in lead)) for i, h in enumerate(heads)]
    col_w = max(8, *(len(c) for c in classes))
    pred_w = max(len("predicted"), col_w)  # "predicted" is 9 wide: a col_w of 8 set rows off by one
    log("  ".join(f"{h:<{w}}" for h, w in zip(heads, lead_w)) + f"  {'predicted':<{pred_w}}  "
        + "  ".join(f"{c:>{col_w}}" for c in classes))
    for r, cells in zip(results, lead):
        log("  ".join(f"{c:<{w}}" for c, w in zip(cells, lead_w)) + f"  {r['prediction']:<{pred_w}}  "
            + "  ".join(f"{r['probabilities'][c]:>{col_w}.3f}" for c in classes))


def cmd_predict(args):
    """Class probabilities of each image file (or each image in a folder), or of each
    face found in it (face_detector)."""
    if not args.paths:  # `predict --checkpoint a.pt face.jpg` took face.jpg for a checkpoint
        raise FerError("no image files or folders given; give them before --checkpoint, which takes every "
                       "path after it: fer.py predict faces/ --checkpoint a.pt b.pt")
    files = find_images(args.paths)  # a wrong path fails before the model loads
    cascade = face_detector(args.detect)  # and so does --detect without OpenCV
    rt, members = evaluation_setup(args)
    classes = members[0].ckpt["classes"]
    faces, images = read_faces(files, cascade, args.detect, member_inputs(members))
    probs, _ = ensemble_probs(members, images, rt, args.batch_size, args.tta)
    results = prediction_rows(faces, probs, classes, args.top)
    log_prediction_table(results, classes)
    write_json(args.json, dict(arch=ensemble_arch(members), tta=args.tta, classes=classes,
                               members=[member_dict(m) for m in members], predictions=results))
    if args.save_dir:
        make_folder(args.save_dir, "--save-dir")
        picture = draw_predictions(images[members[0].input], results, classes)
        write_file(Path(args.save_dir) / "predictions.png", lambda f: picture.save(f, format="PNG"))
        log(f"wrote {Path(args.save_dir) / 'predictions.png'}")
        save_photos(args.save_dir, results)
    return results


def load_font(size):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: scalable
    except TypeError:
        return ImageFont.load_default()  # older Pillow: its small bitmap font


def draw_confusion_matrix(cm, classes, cell=80, font_size=16):
    """Counts in cells coloured by the row-normalised rate (recall on the diagonal).

    The size follows from the arguments, not from font metrics, so it is the same
    on every machine: a name is given 0.6 font_size a character (more than lowercase
    needs) and cells are at least that wide, so column names never overlap.
    """
    n, pad, line = len(classes), 12, round(1.5 * font_size)
    name_w = math.ceil(0.6 * font_size * max(len("true"), *map(len, classes)))
    cell = max(cell, name_w + 8)  # column names never overlap
    left, top = pad + name_w + pad, pad + 2 * line
    note = "colour and %: share of the true class (row)"
    width = max(left + n * cell, pad + math.ceil(0.6 * round(0.8 * font_size) * len(note))) + pad
    img = Image.new("RGB", (width, top + n * cell + line + pad), "white")
    d = ImageDraw.Draw(img)
    text, big, small = load_font(font_size), load_font(round(1.25 * font_size)), load_font(round(0.8 * font_size))

    def centred(x, y, s, f, fill="black"):
        d.text((x - d.textlength(s, font=f) / 2, y), s, font=f, fill=fill)

    rates = cm.float() / cm.sum(1, keepdim=True).clamp(min=1)
    centred(left + n * cell / 2, pad, "predicted", text, "dimgray")
    d.text((pad, top - line), "true", font=text, fill="dimgray")
    for i, name in enumerate(classes):
        centred(left + (i + 0.5) * cell, top - line, name, text)
        d.text((pad, top + i * cell + (cell - font_size) / 2), name, font=text, fill="black")
        for j in range(n):
            r = float(rates[i, j])
            x, y = left + j * cell, top + i * cell
            d.rectangle((x, y, x + cell, y + cell), fill=(int(255 - 215 * r), int(255 - 155 * r), 255),
                        outline="darkgray")
            ink = "white" if r > 0.5 else "black" if cm[i, j] else "darkgray"
            centred(x + cell / 2, y + cell / 2 - 1.3 * font_size, str(int(cm[i, j])), big, ink)
            centred(x + cell / 2, y + cell / 2 + 0.2 * font_size, f"{r:.0%}", small, ink)
    d.text((pad, top + n * cell + line / 3), note, font=small, fill="dimgray")
    return img


def draw_curves(history, best_epoch, width=960, height=360, font_size=14):
    """Training loss (left) and validation accuracy and Macro-F1 (right; with --ema the
    averaged weights' Macro-F1 too) by epoch, the kept epoch (best validation Macro-F1)
    marked by a grey line in both."""
    epochs = [h["epoch"] for h in history]
    panels = [("training loss", [("loss", [h["loss"] for h in history], "firebrick")]),
              ("validation", [("accuracy", [h["val_accuracy"] for h in history], "steelblue"),
                              ("Macro-F1", [h["val_macro_f1"] for h in history], "darkorange")])]
    if "ema_val_macro_f1" in history[0]:
        panels[1][1].append(("EMA Macro-F1", [h["ema_val_macro_f1"] for h in history], "seagreen"))
    if "test_macro_f1" in history[0]:  # --watch-test: a panel of its own, apart from what chooses
        panels.append(("test (watched, never used)", [("accuracy", [h["test_accuracy"] for h in history], "steelblue"),
                                                      ("Macro-F1", [h["test_macro_f1"] for h in history], "darkorange")]))
    width = width * len(panels) // 2
    img = Image.new("RGB", (width, height), "white")
    d, font = ImageDraw.Draw(img), load_font(font_size)
    for k, (title, series) in enumerate(panels):
        plot_panel(d, (k * width // len(panels), 0, (k + 1) * width // len(panels), height), epochs, series,
                   best_epoch, title, font)
    return img


def plot_panel(d, box, xs, series, mark, title, font):
    """Lines of `series` [(name, ys, colour)] against xs in `box`, with ticks on both
    axes, a legend, and a vertical line at x = mark."""
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 62, x1 - 18, y0 + 34, y1 - 44
    values = [v for _, ys, _ in series for v in ys]
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 or 0.05  # a flat line sits mid-panel
    lo, hi = lo - pad, hi + pad
    span = max(xs[-1] - xs[0], 1)
    px = lambda x: left + (x - xs[0]) / span * (right - left) if len(xs) > 1 else (left + right) / 2  # noqa: E731
    py = lambda v: bottom - (v - lo) / (hi - lo) * (bottom - top)  # noqa: E731
    d.text((left, y0 + 8), title, font=font, fill="black")
    d.rectangle((left, top, right, bottom), outline="gray")
    for i in range(5):  # y ticks
        v = lo + (hi - lo) * i / 4
        d.line((left - 4, py(v), left, py(v)), fill="gray")
        d.text((x0 + 8, py(v) - 7), f"{v:.3f}", font=font, fill="dimgray")
    step = max(1, math.ceil(span / 8))
    for x in range(xs[0], xs[-1] + 1, step):  # x ticks
        d.line((px(x), bottom, px(x), bottom + 4), fill="gray")
        d.text((px(x) - 6, bottom + 6), str(x), font=font, fill="dimgray")
    d.text(((left + right) / 2 - 18, bottom + 24), "epoch", font=font, fill="dimgray")
    if mark in xs:
        d.line((px(mark), top, px(mark), bottom), fill="darkgray", width=1)
        d.text((px(mark) + 4, bottom - 20), f"kept: epoch {mark}", font=font, fill="dimgray")
    for j, (name, ys, colour) in enumerate(series):
        points = [(px(x), py(y)) for x, y in zip(xs, ys)]
        if len(points) > 1:
            d.line(points, fill=colour, width=2)
        for x, y in points[-1:] if len(points) > 1 else points:
            d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        lx = right - 110 * (len(series) - j)  # the legend, in the title's row
        d.line((lx, y0 + 16, lx + 20, y0 + 16), fill=colour, width=3)
        d.text((lx + 26, y0 + 8), name, font=font, fill="black")


def draw_mistakes(faces, probs, limit, tile=128, font_size=14):
    """A grid of misclassified images, the most confident mistakes first, each
    captioned with its true class and, in red, the predicted class and confidence.

    Size, from the arguments alone: 4 to 8 columns of tile + gap (8 px) plus a gap
    wide; a header line, then rows of tile + 2 caption lines + gap, lines being
    1.3 font_size high.
    """
    font = load_font(font_size)
    conf, pred = probs.max(1)
    wrong = (pred != faces.labels).nonzero().flatten()
    shown = wrong[conf[wrong].argsort(descending=True)][:limit]
    cols = min(8, max(4, len(shown)))  # at least 4, so the header fits
    rows = max(1, math.ceil(len(shown) / cols))
    gap, line = 8, round(1.3 * font_size)
    top, row_h = gap + line, tile + 2 * line + gap
    img = Image.new("RGB", (gap + cols * (tile + gap), top + gap + rows * row_h), "white")
    d = ImageDraw.Draw(img)
    d.text((gap, gap // 2), f"{len(shown)} of {len(wrong)} mistakes in {len(probs)} images, most confident first"
           if len(wrong) else f"no mistakes in {len(probs)} images", font=font, fill="black")
    for k, i in enumerate(shown.tolist()):
        x, y = gap + (k % cols) * (tile + gap), top + gap + (k // cols) * row_h
        face = T.functional.to_pil_image(faces.images[i]).convert("RGB")
        img.paste(face.resize((tile, tile), Image.BICUBIC), (x, y))
        d.rectangle((x - 1, y - 1, x + tile, y + tile), outline="darkgray")  # white faces on white
        d.text((x, y + tile + 2), f"true: {faces.classes[faces.labels[i]][:10]}", font=font, fill="black")
        d.text((x, y + tile + 2 + line), f"pred: {faces.classes[pred[i]][:10]} {float(conf[i]):.0%}",
               font=font, fill="firebrick")
    return img


def draw_predictions(images, results, classes, tile=112, font_size=13):
    """One card per image: the face as the network saw it, its file name, and a bar
    per class, the predicted one in red. The size follows from the arguments alone
    (0.6 font_size a character for the class names), as in draw_confusion_matrix."""
    font = load_font(font_size)
    line, gap = round(1.4 * font_size), 10
    name_w = math.ceil(0.6 * font_size * max(map(len, classes)))
    card_w, card_h = tile + gap + name_w + 120, max(tile, line * (len(classes) + 1))
    cols = min(len(results), 3)
    rows = math.ceil(len(results) / cols)
    img = Image.new("RGB", (gap + cols * (card_w + gap), gap + rows * (card_h + gap)), "white")
    d = ImageDraw.Draw(img)
    for k, (face, r) in enumerate(zip(images, results)):
        x, y = gap + (k % cols) * (card_w + gap), gap + (k // cols) * (card_h + gap)
        img.paste(T.functional.to_pil_image(face).convert("RGB").resize((tile, tile), Image.BICUBIC), (x, y))
        d.rectangle((x - 1, y - 1, x + tile, y + tile), outline="darkgray")
        bx = x + tile + gap
        d.text((bx, y), Path(r["file"]).name[:24], font=font, fill="black")
        for i, c in enumerate(classes):
            p, by = r["probabilities"][c], y + (i + 1) * line
            ink = "firebrick" if c == r["prediction"] else "steelblue"
            d.text((bx, by), c, font=font, fill=ink if c == r["prediction"] else "black")
            d.rectangle((bx + name_w + 4, by + 2, bx + name_w + 4 + round(80 * p), by + line - 4), fill=ink)
            d.text((bx + name_w + 88, by), f"{p:.0%}", font=font, fill="dimgray")
    return img


def draw_faces(photo, results):
    """The photo with each face's box and, on a band above it, its predicted class
    and probability. Lines and letters grow with the photo, so both stay legible."""
    img = photo.copy()
    d = ImageDraw.Draw(img)
    font = load_font(max(12, round(min(img.size) / 32)))
    width, pad = max(2, round(min(img.size) / 300)), 3
    for r in results:
        x, y, w, h = r["box"]
        d.rectangle((x, y, x + w - 1, y + h - 1), outline="firebrick", width=width)
        text = f"{r['prediction']} {r['probabilities'][r['prediction']]:.0%}"
        _, _, tw, th = d.textbbox((0, 0), text, font=font)
        tx = max(0, min(x, img.width - tw - 2 * pad))  # whole, for a face at the photo's right edge
        ty = y - th - 2 * pad if y >= th + 2 * pad else y + width  # inside the box at the photo's top
        d.rectangle((tx, ty, tx + tw + 2 * pad, ty + th + 2 * pad), fill="firebrick")
        d.text((tx + pad, ty + pad), text, font=font, fill="white")
    return img


def save_photos(save_dir, results):
    """DIR/<name>_faces.png: each photo in which faces were found, annotated by draw_faces."""
    written = set()
    for f in dict.fromkeys(r["file"] for r in results if r["box"]):
        name, n = f"{Path(f).stem}_faces.png", 1
        while name.casefold() in written:  # a/x.jpg, b/x.jpg, x_2.jpg: x_faces, x_2_faces, x_2_2_faces
            n += 1
            name = f"{Path(f).stem}_{n}_faces.png"
        written.add(name.casefold())  # X.jpg and x.jpg: one file on case-insensitive disks
        picture = draw_faces(open_image(f, 3), [r for r in results if r["file"] == f])
        write_file(Path(save_dir) / name, lambda out: picture.save(out, format="PNG"))
        log(f"wrote {Path(save_dir) / name}")


def cmd_export(args):
    """A checkpoint for shipping: weights only (float16 with --half), no optimiser."""
    ckpt = load_checkpoint(args.checkpoint)
    state = weights_only(ckpt)
    if args.half:
        state["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    make_folder(Path(args.out).parent, "--out")
    save_checkpoint(state, args.out)
    log(f"wrote {args.out} ({Path(args.out).stat().st_size / 2**20:.1f} MiB)")


# ----------------------------------------------------------------------------
# Benchmark: the report's pipeline against ours

def bench_train(model, batches, steps, rt, recipe):
    """Training images/s over `steps` steps, after one warm-up step, with the network's
    optimiser (for AlexNet and VGG11 Adam's update is a large share of a step)."""
    optimizer = make_optimizer(model, recipe["optimizer"], recipe["lr"], recipe["weight_decay"])
    criterion = nn.CrossEntropyLoss()
    model.train()
    tic, done = None, 0
    for step, (x, y) in enumerate(batches):
        with rt.autocast():
            loss = compute_loss(model(rt.prepare(x)), y, criterion)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if rt.device.type == "cuda" and step in (0, steps):
            torch.cuda.synchronize()  # kernels run asynchronously: wait before reading the clock
        if step == 0:
            tic = time.time()  # the first step pays for allocation and kernel choice
        else:
            done += len(y)
        if step == steps:
            break
    return done / (time.time() - tic)


def bench_infer(model, faces, rt, batch_size):
    n = min(len(faces.labels), batch_size * 4)
    predict_probs(model, faces.images[:batch_size], rt, batch_size)  # warm-up
    tic = time.time()
    predict_probs(model, faces.images[:n], rt, batch_size)
    return n / (time.time() - tic)


def peak_memory(rt):
    """What the peak memory column measures on this device, and its value in MiB."""
    if rt.device.type == "cuda":
        return "GPU memory", torch.cuda.max_memory_allocated(rt.device) / 2**20
    import resource  # not on Windows
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return "RSS", peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def cmd_bench(args):
    """Training and inference throughput of the report's pipeline and of ours."""
    args.model = args.model or "resnet34"
    recipe = {**TRAIN_DEFAULTS, **OURS[args.model]}  # what `train` runs by default
    size = args.image_size or recipe["image_size"]
    batch = args.batch_size or recipe["batch_size"]
    check_image_size(args.model, size)
    check_image_size(args.model, args.report_size, "--report-size")
    n_images = batch * (args.steps + 1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) / "train" if args.data else write_fake_folder(Path(tmp), 2, n_images)
        ours = setup_runtime(args)
        plain = Runtime(ours.device)  # float32, default memory layout
        log(f"bench {args.model}, batch {batch}, {args.steps} timed steps after one warm-up "
            f"(precision and layout are training's; inference on a CPU runs in float32), on "
            f"{describe_device(ours.device)}\ntraining precision: {describe_precision(ours, args)}")
        # At the training size, every precision x layout pair, so each speed-up shows on its own;
        # the last row is ours as `train` runs it (optionally compiled).
        pairs = dict.fromkeys((amp, cl) for amp in (None, ours.amp_dtype) for cl in (False, ours.channels_last))
        configs = [("report: PIL per image", plain, "pil", args.report_size, False),
                   ("ours: in-memory tensors", ours, "tensor", args.report_size, False)]
        configs += [("ours: in-memory tensors", replace(ours, amp_dtype=amp, channels_last=cl), "tensor", size, False)
                    for amp, cl in pairs]
        if args.compile:
            configs.append(("ours + torch.compile", ours, "tensor", size, True))
        augmentation = {k: recipe[k] for k in ("crop_scale", "rotation", "erasing")}
        rows = []
        for label, rt, pipeline, s, compiled in configs:
            faces = load_faces(root, s, args.in_channels, skip_bad=True, limit=n_images)
            opts = argparse.Namespace(**augmentation, image_size=s, in_channels=args.in_channels, workers=args.workers)
            torch.manual_seed(0)
            model = build_model(args.model, len(faces.classes), args.in_channels, s, rt)
            if compiled:  # the warm-up step pays for compilation
                model = torch.compile(model)
            idx = torch.arange(len(faces.labels)).repeat(math.ceil(n_images / len(faces.labels)))
            batches = (pil_batches if pipeline == "pil" else tensor_batches)(faces, idx, batch, opts, rt, 0)
            train_ips = bench_train(model, batches, args.steps, rt, recipe)
            infer_ips = bench_infer(model, faces, rt, batch)
            rows.append(train_ips)
            memory, mib = peak_memory(rt)
            log(f"{label:<24} {s:>4}px  {rt.precision:>8}  channels_last={str(rt.channels_last):<5}  "
                f"train {train_ips:7.1f} img/s  infer {infer_ips:7.1f} img/s  peak {memory} {mib:5.0f} MiB")
            num_classes = len(faces.classes)
            del model, faces
        default = rows[len(pairs) + 1]
        alone = bench_network_alone(args, ours, size, batch, num_classes, recipe)
        log(f"ours / report at {args.report_size}px: {rows[1] / rows[0]:.1f}x training; "
            f"ours at {size}px / report at {args.report_size}px: {default / rows[0]:.1f}x; "
            f"an epoch of 4,500 images at {size}px: about {4500 / default:.0f} s; "
            f"ours / the network alone: {default / alone:.2f} of its speed"
            + (f"; torch.compile: {rows[-1] / default:.2f}x" if args.compile else ""))
    return rows + [alone]


def bench_network_alone(args, rt, size, batch, num_classes, recipe):
    """Training images/s of the network on one batch of random tensors already in
    memory, in training's precision and layout: the most any input pipeline could
    feed (the pipeline rows pay for decoding, augmentation and the layout change)."""
    torch.manual_seed(0)
    model = build_model(args.model, num_classes, args.in_channels, size, rt)
    x = rt.prepare(torch.randn(batch, args.in_channels, size, size, device=rt.device))
    y = torch.randint(0, 2, (batch,), device=rt.device)
    ips = bench_train(model, itertools.repeat((x, y)), args.steps, rt, recipe)
    log(f"{'the network alone':<24} {size:>4}px  {rt.precision:>8}  channels_last={str(rt.channels_last):<5}  "
        f"train {ips:7.1f} img/s  (random tensors in memory)")
    return ips


def write_fake_folder(root, classes, n):
    """A throwaway ImageFolder of random 48x48 JPEGs, for `bench` without --data."""
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(max(1, n // classes)):
            pixels = torch.randint(0, 256, (48, 48), dtype=torch.uint8, generator=g)
            Image.fromarray(pixels.numpy(), "L").save(root / f"class{c}" / f"{i}.jpg")
    return root


# ----------------------------------------------------------------------------
# Command line

class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, not argparse's usage block: what is wrong and where to look."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type for a number in a range, checked before any work starts."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}")
        bad_low = low is not None and (v <= low if low_open else v < low)
        bad_high = high is not None and (v >= high if high_open else v > high)
        if bad_low or bad_high or (kind is float and not math.isfinite(v)):
            lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be {' and '.join(filter(None, (lo, hi)))})")
        return v
    return parse


def mixup_alpha(text):
    """--mixup: 0 (off), or an alpha that Beta's sampler handles (MIXUP_MIN_ALPHA)."""
    alpha = number(float, 0, 100)(text)
    if 0 < alpha < MIXUP_MIN_ALPHA:
        raise argparse.ArgumentTypeError(f"{text} is too small: use at least {MIXUP_MIN_ALPHA:g}, or 0 for no mixup")
    return alpha


def class_list(text):
    """--classes: comma-separated class folder names, at least two, each once."""
    names = [n.strip() for n in text.split(",")]
    if any(not n for n in names) or len(set(names)) != len(names) or len(names) < 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of two or more different class folder "
                                         "names separated by commas (e.g. angry,happy,neutral,sad,surprise)")
    return names


def recipe_table():
    """`train --help`'s table of the recipes, made from RECIPES so it cannot drift; short
    only where it differs from ours."""
    rows = [("network", "recipe", "optimizer", "lr", "batch", "epochs", "size", "schedule", "augmentation, loss")]
    for net in sorted(MODELS):
        for name in ["ours", "report"] + ["short"] * (SHORT[net] != OURS[net]):
            r = {**TRAIN_DEFAULTS, **RECIPES[name][net]}
            aug = [f"crop {r['crop_scale']:g}-1", "flip"] + [f"rotate {r['rotation']:g}"] * (r["rotation"] > 0) \
                + [f"erase {r['erasing']:g}"] * (r["erasing"] > 0) \
                + [f"label smoothing {r['label_smoothing']:g}"] * (r["label_smoothing"] > 0) \
                + [f"wd {r['weight_decay']:g}"] * (r["weight_decay"] > 0)
            rows.append((net, name, r["optimizer"], f"{r['lr']:g}", r["batch_size"], r["epochs"], r["image_size"],
                         r["schedule"], ", ".join(aug)))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(f"{str(v):<{w}}" for v, w in zip(row, widths)).rstrip() for row in rows]
    return "recipes (--recipe; an option given explicitly overrides its value):\n" + "\n".join(lines)


FMT = dict(formatter_class=argparse.RawDescriptionHelpFormatter)  # keeps the help's tables as written

def runtime_options(q):
    q.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to run; auto takes cuda, then mps, then cpu (default: %(default)s)")
    q.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision: bfloat16 (float16 + grad scaling on GPUs without bf16); "
                        "default: on for cuda, and on cpu when it has native bf16 instructions")
    q.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory layout (default: on for cpu and cuda)")
    q.add_argument("--threads", type=number(int, 1), default=None,
                   help="CPU threads (default: $OMP_NUM_THREADS if set, as torchrun does, else all cores)")
    q.add_argument("--workers", type=number(int, 0), default=2,
                   help="DataLoader processes for --pipeline pil (default: %(default)s)")


def evaluation_options(q, data_help, data_default):
    q.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT",
                   help="a .pt file written by train or export; several are an ensemble, which averages their "
                        "class probabilities, each network at its own image size")
    q.add_argument("--data", default=data_default, help=f"{data_help} (default: {data_default or 'the --data the checkpoint was trained with'})")
    q.add_argument("--batch-size", type=number(int, 1), default=128, help="(default: %(default)s)")
    q.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH (default: print only)")
    runtime_options(q)


TTA = dict(choices=["none", "flip", "tencrop"], default="none",
           help="test-time augmentation: average softmax over the mirror image or ten crops (default: %(default)s)")


def add_prepare(sub):
    """`prepare`: FER2013 as downloaded -> the folders below."""
    q = sub.add_parser("prepare", help="FER2013 as downloaded -> OUT/fer5 (the report's split) and OUT/fer2013", **FMT)
    q.add_argument("src", metavar="SRC", help="fer2013.csv, icml_face_data.csv, the image-folder copy "
                   "(train/<class>/, test/<class>/) or the .zip / .tar.gz holding one of them")
    q.add_argument("--out", default="data", help="folder to write fer5/ and fer2013/ into (default: %(default)s)")
    q.add_argument("--manifest", default=MANIFEST,
                   help="the fer5 split, face by face (default: data/fer5_manifest.csv beside fer.py)")
    q.set_defaults(func=cmd_prepare)


def augmentation_options(t):
    """train's augmentation options: what each training batch goes through."""
    D = TRAIN_DEFAULTS
    t.add_argument("--crop-scale", type=number(float, 0, 1, low_open=True),
                   help=f"smallest area fraction of the random resized crop (default: {D['crop_scale']}, or the recipe's)")
    t.add_argument("--rotation", type=number(float, 0, 180), help=f"largest random rotation in degrees (default: {D['rotation']}, or the recipe's)")
    t.add_argument("--erasing", type=number(float, 0, 1), help=f"probability of random erasing (default: {D['erasing']}, or the recipe's)")
    t.add_argument("--mixup", type=mixup_alpha, metavar="ALPHA",
                   help="blend pairs of training images and their labels by a weight drawn from "
                        f"Beta(ALPHA, ALPHA), {MIXUP_MIN_ALPHA:g} to 100; the paper used 0.1-0.4 on ImageNet; "
                        f"0 turns it off (default: {D['mixup']})")


def add_train(sub):
    """`train` and its options, with the recipes' table as its epilog."""
    D = TRAIN_DEFAULTS
    t = sub.add_parser("train", help="train a network; keeps the best (validation Macro-F1) and last epoch",
                       epilog=recipe_table(), **FMT)
    t.add_argument("--data", help=f"folder with train/<class>/ images (default: {DEFAULT_DATA}, "
                   "or the resumed run's)")
    t.add_argument("--model", choices=sorted(MODELS), help="network (default: resnet34)")
    t.add_argument("--out", help="folder for best.pt and last.pt (default: runs/<model>)")
    t.add_argument("--recipe", choices=sorted(RECIPES), help="the per-network values of the table below: "
                   "ours (fast on a CPU), the report's, or short (ResNet34 cut to a third of ours' time for CPUs "
                   "without native bfloat16, at some accuracy); options given explicitly override it (default: ours)")
    t.add_argument("--resume", metavar="CKPT", help="continue the run saved in CKPT (its last.pt) "
                   "with the options it was started with (default: a new run)")
    t.add_argument("--epochs", type=number(int, 1), help="epochs (default: per network and recipe)")
    t.add_argument("--batch-size", type=number(int, 1), help="global batch size (default: per network and recipe)")
    # Optimisers keep the rate in float32: a larger one overflows inside them, not in a clear error.
    t.add_argument("--lr", type=number(float, 0, torch.finfo(torch.float32).max, low_open=True),
                   help="peak learning rate, the starting one for plateau (default: per network and recipe)")
    t.add_argument("--optimizer", choices=["sgd", "adam", "adamw"],
                   help="SGD with Nesterov momentum 0.9, Adam or AdamW (default: per network and recipe)")
    t.add_argument("--schedule", choices=["onecycle", "cosine", "constant", "plateau"],
                   help="learning-rate schedule: onecycle, cosine and constant step per batch; plateau "
                   f"halves the rate once {PLATEAU_PATIENCE + 1} epochs in a row bring no new best "
                   f"validation Macro-F1 (default: {D['schedule']}, or the recipe's)")
    t.add_argument("--weight-decay", type=number(float, 0), help=f"(default: {D['weight_decay']}, or the recipe's)")
    t.add_argument("--label-smoothing", type=number(float, 0, 1, high_open=True), help=f"(default: {D['label_smoothing']}, or the recipe's)")
    t.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=None,
                   help="weight the loss by inverse class frequency (default: off)")
    t.add_argument("--image-size", type=number(int, 1), help="side of the square network input; "
                   "images are resized to it once, when decoded (default: per network and recipe)")
    t.add_argument("--in-channels", type=int, choices=[1, 3], help=f"1 for grayscale, 3 for RGB (default: {D['in_channels']})")
    augmentation_options(t)
    t.add_argument("--classes", type=class_list, metavar="A,B,...",
                   help="train on these class folders of DATA/train only, e.g. --data data/fer2013 --classes "
                        "angry,happy,neutral,sad,surprise (default: every class folder)")
    t.add_argument("--ema", type=number(float, 0, 1, True, True), metavar="DECAY",
                   help="also keep an exponential moving average of the weights and BatchNorm statistics, "
                        "updated after every step with this decay (e.g. 0.999); validated each epoch beside "
                        "the raw weights, and best.pt keeps whichever is better (default: off)")
    t.add_argument("--val-fraction", type=number(float, 0, 1, True, True),
                   help=f"share of each class of train/ held out for validation (default: {D['val_fraction']})")
    t.add_argument("--split-seed", type=int, help="seed of the train / validation split; runs that differ only in "
                   f"--seed hold out the same faces, so their means and ensembles compare (default: {D['split_seed']})")
    t.add_argument("--seed", type=int, help="seed of the initialisation, the batch order, the augmentation and mixup "
                   f"(default: {D['seed']})")
    t.add_argument("--pipeline", choices=["tensor", "pil"],
                   help="tensor: decoded once, augmented per batch; pil: the report's per-image "
                        "PIL transforms, for comparison (default: tensor)")
    t.add_argument("--skip-bad-images", action=argparse.BooleanOptionalAction, default=None,
                   help="leave out images that cannot be decoded instead of stopping (default: off)")
    t.add_argument("--watch-test", action="store_true", default=None,
                   help="also score DATA/test after every epoch into history.csv and curves.png, to measure what "
                        "choosing the epoch on the test set (as the report did) would flatter; never used to choose "
                        "the epoch or anything else: the one exception to `test` alone reading it (default: off)")
    t.add_argument("--compile", action="store_true", help="torch.compile the network (default: off)")
    t.add_argument("--dry-run", action="store_true", help="one epoch only, to check a setup quickly")
    runtime_options(t)
    t.set_defaults(func=cmd_train)


def add_evaluation(sub):
    """`validate` and `test`."""
    v = sub.add_parser("validate", help="metrics on the run's validation split (rebuilt from the checkpoint); "
                       "choose --tta here, not on the test split", **FMT)
    evaluation_options(v, "folder with train/<class>/", None)
    v.add_argument("--tta", **TTA)
    v.set_defaults(func=cmd_validate)

    s = sub.add_parser("test", help="full metrics on DIR/test/ (the only command that reads it)", **FMT)
    evaluation_options(s, "folder with test/<class>/", DEFAULT_DATA)
    s.add_argument("--tta", **TTA)
    s.add_argument("--save-dir", metavar="DIR", help="write metrics.json, confusion_matrix.png and mistakes.png to DIR (default: none)")
    s.add_argument("--mistakes", type=number(int, 1), default=32,
                   help="how many mistakes mistakes.png shows (default: %(default)s)")
    s.add_argument("--skip-bad-images", action="store_true", help="leave out unreadable images (default: off)")
    s.add_argument("--labels", choices=["fer2013", "ferplus"], default="fer2013",
                   help="score against the folders' (FER2013's) labels, or against the FER+ crowd majority "
                        "(more than half of ten votes) of each face that the manifest gives one, matched by class and "
                        "file name; prints how many faces it used (default: %(default)s)")
    s.add_argument("--manifest", default=MANIFEST,
                   help="the manifest with the FER+ votes (default: data/fer5_manifest.csv beside fer.py)")
    s.set_defaults(func=cmd_test)


def add_predict(sub):
    """`predict` on image files and folders."""
    # The paths first: --checkpoint takes every path after it (several make an ensemble).
    r = sub.add_parser("predict", help="class probabilities of image files or folders", **FMT,
                       usage="%(prog)s PATH [PATH ...] [--checkpoint CKPT [CKPT ...]] [options]")
    r.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders of images")
    r.add_argument("--checkpoint", nargs="+", default=[DEFAULT_CHECKPOINT], metavar="CKPT",
                   help="a .pt file written by train or export; several are an ensemble, which averages their "
                        "class probabilities; give the PATHs first, as it takes every path after it "
                        "(default: checkpoints/googlenet_fer2013_5class_e30.pt beside fer.py, the shipped "
                        "five-class model)")
    r.add_argument("--save-dir", metavar="DIR", help="write DIR/predictions.png: each face, its predicted "
                   "class and a bar of the class probabilities; and for each photo in which faces were found, "
                   "DIR/NAME_faces.png: the photo with each face's box, class and probability (default: none)")
    r.add_argument("--top", type=number(int, 1), default=3, metavar="K",
                   help="how many classes, most probable first, the JSON's `top` lists per image; the table "
                        "and the JSON's `probabilities` always give every class (default: %(default)s)")
    r.add_argument("--detect", action=argparse.BooleanOptionalAction, default=None,
                   help="find the frontal faces in each picture first, and classify each face "
                        f"(needs OpenCV: {DETECTOR_INSTALL}); default: with OpenCV installed, on for pictures "
                        f"that are not face crops (longer side above {CROP_MAX_SIDE} px, or sides further apart "
                        f"than {CROP_MAX_ASPECT:g}:1), else off")
    r.add_argument("--tta", **TTA)
    r.add_argument("--batch-size", type=number(int, 1), default=128, help="(default: %(default)s)")
    r.add_argument("--json", metavar="PATH", help="also write the predictions as JSON to PATH (default: print only)")
    runtime_options(r)
    r.set_defaults(func=cmd_predict, device="cpu")


def add_bench(sub):
    """`bench`: the report's pipeline against ours."""
    b = sub.add_parser("bench", help="training and inference images/s: the report's pipeline against ours", **FMT)
    b.add_argument("--model", choices=sorted(MODELS), help="network (default: resnet34)")
    b.add_argument("--data", help="folder with train/<class>/ (default: random images made on the fly)")
    b.add_argument("--image-size", type=number(int, 1), help="our input size (default: the network's recipe)")
    b.add_argument("--report-size", type=number(int, 1), default=224, help="the report's input size (default: %(default)s)")
    b.add_argument("--batch-size", type=number(int, 1), help="(default: the network's recipe)")
    b.add_argument("--steps", type=number(int, 1), default=3, help="timed training steps per pipeline (default: %(default)s)")
    b.add_argument("--in-channels", type=int, choices=[1, 3], default=3, help="(default: %(default)s)")
    b.add_argument("--compile", action="store_true",
                   help="add a row for ours with torch.compile; compiling adds about 40 s "
                        "for ResNet34 on 2 cores (default: off)")
    runtime_options(b)
    b.set_defaults(func=cmd_bench)


def add_export(sub):
    """`export`: weights only, for shipping."""
    e = sub.add_parser("export", help="a weights-only checkpoint for shipping (float16 with --half)", **FMT)
    e.add_argument("--checkpoint", required=True, help="a .pt file written by train")
    e.add_argument("--out", required=True, help="the file to write")
    e.add_argument("--half", action="store_true", help="store weights in float16, half the size (default: float32)")
    e.set_defaults(func=cmd_export)


def build_parser():
    p = Parser(prog="fer.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    for add in (add_prepare, add_train, add_evaluation, add_predict, add_bench, add_export):
        add(sub)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FerError as e:
        print(f"fer.py {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        hint = ""
        if args.command == "train" and args.out and (Path(args.out) / "last.pt").is_file():
            hint = f"; {args.out}/last.pt holds the last completed epoch: continue with " \
                   f"python fer.py train --resume {args.out}/last.pt"
        print(f"fer.py {args.command}: interrupted{hint}", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
