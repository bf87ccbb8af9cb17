#!/usr/bin/env python
"""fer: facial expression recognition with classic CNNs trained from scratch.

    python fer.py train    --recipe report --model resnet34   # the report's recipe: 224 px, Adam, hours
    python fer.py train    --model resnet34                   # ours (the default): 64 px, minutes
    python fer.py validate --checkpoint runs/resnet34/best.pt
    python fer.py test     --checkpoint runs/resnet34/best.pt
    python fer.py test     --checkpoint runs/resnet34/best.pt --checkpoint runs/googlenet/best.pt  # ensemble

This file is the report's path, read top to bottom: recipes; data (image folders
decoded into tensors, the split, augmentation, the report's own transforms);
models and checkpoints; the loops (one training epoch, one evaluation); the
commands train, validate and test; the command line. nets.py holds the networks, metrics.py the confusion-matrix
metrics; runs.py the checkpoint files, runtime.py the device and precision,
pictures.py the drawings. Each other job is a script of its own: prepare.py
(FER2013 as downloaded -> data/), predict.py (faces in pictures and photos),
bench.py (images/s), export.py (weights for shipping). `python fer.py <command>
--help` lists every option and its default.
"""
import common  # first: it makes Ctrl-C while torch loads one line, not a traceback
import argparse
import itertools
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image, ImageOps
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import ferplus
import metrics
import pictures
from runs import MAX_IMAGE_SIZE, check_out, load_checkpoint, save_run, weights_only
from runtime import Progress, describe_device, log, setup_runtime
from common import (IMG_EXTENSIONS, MANIFEST, UNREADABLE_IMAGE, FerError, Parser, check_writable, make_folder,
                    number, write_json)
from nets import MODELS

# Per-network defaults of `train`: the recipes of the results in the README. All
# train at 64x64 (48x48 faces upscaled once; 224 costs 9x the time, see `bench`)
# with a OneCycle schedule; VGG11, the slowest per image, runs at the native 48x48
# for 15 epochs to fit a CPU budget. The nets with BatchNorm take SGD + Nesterov
# momentum; AlexNet and VGG11 (no BN) learn much faster with Adam (RESULTS.md, Method).
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
RECIPES = {"ours": OURS, "report": REPORT}
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
# --skip-bad-images means the same on every command that reads pictures.
SKIP_BAD = dict(action="store_true", default=None, help="leave out the pictures that cannot be decoded, counting "
                "them and naming the first, instead of stopping at the first (default: off)")

# --schedule plateau halves the rate once 6 epochs in a row bring no new best
# validation Macro-F1 (torch cuts when the count exceeds the patience): on fer5's 500
# validation faces the figure moves by about 0.02 from one epoch to the next mid-run
# (epochs 21-45 of ResNet34's 60-epoch runs with Adam, batch 32 and no label
# smoothing), so a shorter patience would cut on noise.
PLATEAU = torch.optim.lr_scheduler.ReduceLROnPlateau
PLATEAU_FACTOR, PLATEAU_PATIENCE = 0.5, 5
# The options that make a training run what it is: recorded in its checkpoints, kept by --resume.
TRAIN_OPTIONS = ("model", "recipe", "epochs", "batch_size", "lr", "optimizer", "schedule", "weight_decay",
                 "label_smoothing", "balanced", "image_size", "in_channels", "crop_scale", "rotation",
                 "erasing", "mixup", "ema", "val_fraction", "split_seed", "seed", "pipeline", "skip_bad_images",
                 "classes", "watch_test")
# What a checkpoint's `args` records: the training options and where the run read and wrote.
RUN_OPTIONS = TRAIN_OPTIONS + ("data", "out", "amp", "channels_last")
# What `--resume` needs beyond CHECKPOINT_KEYS (best.pt and exports drop the first three).
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "epoch", "best_metric", "best_epoch", "history")
# The command line's test-time views and help layout (RawDescription keeps the recipe table).
TTA = dict(choices=["none", "flip", "tencrop"], default="none",
           help="test-time augmentation: average softmax over the mirror image or ten crops (default: %(default)s)")
FMT = dict(formatter_class=argparse.RawDescriptionHelpFormatter)  # keeps the help's tables as written


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
        img = eight_bit(ImageOps.exif_transpose(img))
        if img.mode == "P":  # palette images may carry transparency: go through RGBA
            img = img.convert("RGBA")
        if in_channels == 1 and img.mode in ("LAB", "HSV"):  # Pillow converts these to RGB only
            img = img.convert("RGB")
        return img.convert("RGB" if in_channels == 3 else "L")


def eight_bit(img):
    """16- and 32-bit grayscale scaled by their range to 8 bits (65535 -> 255), where
    Pillow's convert() clips them (a 16-bit face turns all white). A 32-bit integer
    image whose values fit in 16 bits holds 16-bit data (as 16-bit PGMs and TIFFs are
    read), and a float image within 0-1 is scaled from 0-1; other images pass as they are."""
    if img.mode.startswith("I;16"):
        top = 65535
    elif img.mode in ("I", "F"):
        _, high = img.getextrema()
        top = (1.0 if high <= 1 else 255) if img.mode == "F" else (65535 if high <= 65535 else 2**31 - 1)
    else:
        return img
    return img.convert("F").point(lambda v: v * 255 / top).convert("L")


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
        except UNREADABLE_IMAGE as e:
            if not skip_bad:
                raise FerError(f"cannot read image {path} ({e}); delete it or pass --skip-bad-images")
            bad.append(path)
    if bad:
        log(f"note: skipped {len(bad)} unreadable image(s), first {bad[0]}")
    if not kept:
        raise FerError(f"no readable images under {root}; give a folder of images Pillow can decode")
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


def model_from_checkpoint(ckpt, rt, source="the checkpoint"):
    # normalize() applies this file's MEAN and STD: refuse a checkpoint trained with others.
    if (ckpt["mean"], ckpt["std"]) != (MEAN, STD):
        raise FerError(f"{source} was trained with mean {ckpt['mean']} and std {ckpt['std']}, "
                       f"this fer.py normalises with {MEAN} and {STD}; use the fer.py that trained it")
    model = build_model(ckpt["arch"], len(ckpt["classes"]), ckpt["in_channels"], ckpt["image_size"], rt,
                        option=f"{source}'s image size")
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
    return dict(checkpoint=member.path, arch=c["arch"], epoch=c["epoch"], image_size=c["image_size"],
                in_channels=c["in_channels"], weights=c["weights"])


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
    transform = report_transform(args.image_size, args.in_channels)
    data = FileDataset(files, faces.labels[idx].tolist(), transform, args.in_channels)
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
                           f"{total_steps}; train more --epochs, lower --batch-size, or use --schedule constant")
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
# Commands: train, validate, test


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
    if args.dry_run and args.resume:
        raise FerError("--dry-run starts a new one-epoch run to check a set-up; drop --resume, or --dry-run")
    args.model = args.model or "resnet34"
    args.recipe = args.recipe or "ours"
    for k, v in {**TRAIN_DEFAULTS, **RECIPES[args.recipe][args.model]}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.out = args.out or str(Path("runs") / args.model)
    args.data = args.data or DEFAULT_DATA
    if args.dry_run:  # one epoch of a one-epoch schedule, not the first of a longer one
        args.epochs = 1
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
    # last.pt also holds the optimiser's state (SGD's momentum, Adam's two moments) and the average
    mb = sum(v.numel() * v.element_size() for v in raw_model.state_dict().values()) / 1e6
    copies = 1 + (1 if args.optimizer == "sgd" else 2) + (args.ema is not None)
    log(f"{args.out}/ gets best.pt (about {mb:.0f} MB) and last.pt (about {copies * mb:.0f} MB), replaced each epoch")
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


def score_epoch(raw_model, ema, faces, val_idx, test_faces, rt, batch_size):
    """Validation metrics of the raw weights and, with --ema, of the averaged ones (else
    None); with --watch-test, the raw weights' test metrics (else None), written down only."""
    if rt.world > 1:  # BatchNorm statistics drift apart per process: score rank 0's
        for b in itertools.chain(raw_model.buffers(), ema.buffers() if ema is not None else ()):
            dist.broadcast(b, 0)
    m = metrics.classification_metrics(evaluate(raw_model, faces, val_idx, rt, batch_size))
    ema_m = None if ema is None else metrics.classification_metrics(
        evaluate(ema.module, faces, val_idx, rt, batch_size))
    test_m = None if test_faces is None else metrics.classification_metrics(
        evaluate(raw_model, test_faces, torch.arange(len(test_faces.labels)), rt, batch_size))
    return m, ema_m, test_m


def run_ema(ema):
    """last.pt's --ema state: the average and its step count, or nothing."""
    return {} if ema is None else dict(ema=ema.state_dict())


def epoch_summary(epoch, args, loss, m, ema_m, test_m, seconds, lr, images, improved):
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
    dry = " (dry run)" if args.dry_run else ""
    log(f"epoch {epoch:3d}/{args.epochs}{dry}  loss {loss:.4f}  "
        f"val acc {m['accuracy']:.4f}  val macro-F1 {m['macro_f1']:.4f}  "
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
    """Train one network; best.pt keeps the epoch with the best validation Macro-F1,
    last.pt the last one with all that --resume needs."""
    ckpt = resolve_train_args(args)
    check_image_size(args.model, args.image_size)
    out = Path(args.out)
    check_out(out, args.resume)
    created = not out.exists()
    try:
        train(args, ckpt)
    finally:  # a run stopped before its first epoch ended leaves no empty folder behind
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def train(args, ckpt):
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
        m, ema_m, test_m = score_epoch(raw_model, ema, faces, val_idx, test_faces, rt, args.batch_size * 2)
        if isinstance(scheduler, PLATEAU):
            # the raw weights' figure (the rate trains them; an average only follows), and
            # every process sees the same one, so the rates stay equal
            scheduler.step(m["macro_f1"])
        kept = max(m["macro_f1"], ema_m["macro_f1"] if ema is not None else -1.0)  # best.pt keeps the better
        improved = kept > best
        raw_improved = ema is not None and m["macro_f1"] > max((h["val_macro_f1"] for h in history), default=-1.0)
        if improved:
            best, best_epoch = kept, epoch
        history.append(epoch_summary(epoch, args, loss, m, ema_m, test_m, seconds, lr,
                                     steps * args.batch_size, improved))
        if rt.rank == 0:
            state = dict(arch=args.model, classes=faces.classes, image_size=args.image_size,
                         in_channels=args.in_channels, mean=MEAN, std=STD, epoch=epoch, weights="raw",
                         state_dict=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), dry_run=args.dry_run,
                         best_metric=best, best_epoch=best_epoch, val_metrics=m, history=history,
                         args={k: getattr(args, k) for k in RUN_OPTIONS}, **run_ema(ema))
            save_run(Path(args.out), state, best_checkpoint(state, ema, ema_m) if improved else None,
                     best_raw_checkpoint(state) if raw_improved else None)
    raw = ", best_raw.pt" if (Path(args.out) / "best_raw.pt").exists() else ""
    log(f"best validation macro-F1 {best:.4f} at epoch {best_epoch}; checkpoints in {args.out}/ "
        f"(best.pt{raw}, last.pt); {(time.time() - t0) / 60:.1f} min in all")


def evaluation_setup(args):
    """validate's, test's and predict's runtime and the members of --checkpoint, once
    their outputs are known to be writable: a command that fails leaves earlier files as
    they were."""
    for path, option, folder in ((args.json, "--json", False), (getattr(args, "save_dir", None), "--save-dir", True)):
        if path:
            check_writable(path, option, folder)
    rt = setup_runtime(args)
    return rt, load_members(args.checkpoint, rt)


def decode_for(members, folder, skip_bad):
    """FOLDER's images decoded once for each distinct input of the members, checked
    against their classes: {(size, channels): Faces}. Only the class folders the
    members trained on are read (train --classes), so a larger folder serves too."""
    classes = members[0].ckpt["args"]["classes"]
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
        hint = (f"; `python prepare.py FER2013-DOWNLOAD` writes {DEFAULT_DATA}, or give --data DIR"
                if data == DEFAULT_DATA else "")
        raise FerError(f"{folder} not found; --data DIR must hold DIR/{split}/<class>/ image folders{hint}")
    return folder


def validation_split(members, data):
    """The folder, fraction and seed of the validation split the members were trained
    with: one split for all, or the ensemble would be
    scored on faces some member trained on. --data DATA replaces the folder."""
    def split(m):
        a = m.ckpt["args"]
        return str(Path(data or a["data"]).resolve()), a["val_fraction"], a["split_seed"]
    for m in members[1:]:
        if split(m) != split(members[0]):
            (d0, f0, s0), (d, f, s) = split(members[0]), split(m)
            raise FerError(f"{members[0].path} holds out {f0} of {d0} with split seed {s0} for validation but "
                           f"{m.path} {f} of {d} with split seed {s}; an ensemble is validated on one split none "
                           "of its members trained on: give checkpoints trained with the same --data, "
                           "--val-fraction and --split-seed")
    a = members[0].ckpt["args"]
    return data or a["data"], a["val_fraction"], a["split_seed"]


def cmd_validate(args):
    """Metrics on the validation split the run used, rebuilt from the checkpoint(s)."""
    rt, members = evaluation_setup(args)
    data, val_fraction, seed = validation_split(members, args.data)
    # the split is drawn from the faces training decoded: leave out what it left out
    skip_bad = args.skip_bad_images or any(m.ckpt["args"]["skip_bad_images"] for m in members)
    if args.data is None and not (Path(data) / "train").is_dir():  # trained on another machine
        raise FerError(f"{members[0].path} was trained on {data}, which is not here; give --data DIR, the folder "
                       f"it trained on (after prepare.py, {DEFAULT_DATA})")
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
        faces, keep, extra = ferplus.rescore(faces, probs, args.manifest)
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
        pictures.save_png(pictures.draw_confusion_matrix(cm, faces.classes), save_dir / "confusion_matrix.png")
        pictures.save_png(pictures.draw_mistakes(faces, probs, args.mistakes), save_dir / "mistakes.png")
        log(f"wrote {save_dir}/metrics.json, confusion_matrix.png and mistakes.png")
    return m


# ----------------------------------------------------------------------------
# Command line


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
    """`train --help`'s table of the recipes, made from RECIPES so it cannot drift."""
    rows = [("network", "recipe", "optimizer", "lr", "batch", "epochs", "size", "schedule", "augmentation, loss")]
    for net in sorted(MODELS):
        for name in RECIPES:
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


def runtime_options(q):
    q.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to run; auto takes cuda, then mps, then cpu (default: %(default)s)")
    q.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision: bfloat16 (float16 on GPUs without bf16, with grad scaling in training); "
                        "default: on for cuda, and on cpu when it has native bf16 instructions")
    q.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory layout (default: on for cpu and cuda)")
    q.add_argument("--threads", type=number(int, 1), default=None,
                   help="CPU threads (default: $OMP_NUM_THREADS if set, as torchrun does, else all cores)")


def workers_option(q):
    """--workers, on the commands whose loader reads it (the report's PIL pipeline)."""
    q.add_argument("--workers", type=number(int, 0), default=2,
                   help="DataLoader processes of the report's PIL pipeline (default: %(default)s)")


def evaluation_options(q, data_help, data_default):
    q.add_argument("--checkpoint", action="append", required=True, metavar="CKPT",
                   help="a .pt file written by train or export.py; repeat it for an ensemble, which averages the "
                        "class probabilities, each network at its own image size")
    q.add_argument("--data", default=data_default,
                   help=f"{data_help} (default: {data_default or 'the --data the checkpoint was trained with'})")
    q.add_argument("--batch-size", type=number(int, 1), default=128, help="(default: %(default)s)")
    q.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH (default: print only)")
    q.add_argument("--skip-bad-images", **SKIP_BAD)
    runtime_options(q)


def augmentation_options(t):
    """train's augmentation options: what each training batch goes through."""
    D = TRAIN_DEFAULTS
    t.add_argument("--crop-scale", type=number(float, 0, 1, low_open=True),
                   help="smallest area fraction of the random resized crop "
                        f"(default: {D['crop_scale']}, or the recipe's)")
    t.add_argument("--rotation", type=number(float, 0, 180),
                   help=f"largest random rotation in degrees (default: {D['rotation']}, or the recipe's)")
    t.add_argument("--erasing", type=number(float, 0, 1),
                   help=f"probability of random erasing (default: {D['erasing']}, or the recipe's)")
    t.add_argument("--mixup", type=mixup_alpha, metavar="ALPHA",
                   help="blend pairs of training images and their labels by a weight drawn from "
                        f"Beta(ALPHA, ALPHA), {MIXUP_MIN_ALPHA:g} to 100; the paper used 0.1-0.4 on ImageNet; "
                        f"0 turns it off (default: {D['mixup']})")


def optimisation_options(t):
    """train's options of the optimisation: epochs, batch, rate, optimiser, schedule, loss."""
    D = TRAIN_DEFAULTS
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
    t.add_argument("--label-smoothing", type=number(float, 0, 1, high_open=True),
                   help=f"(default: {D['label_smoothing']}, or the recipe's)")
    t.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=None,
                   help="weight the loss by inverse class frequency (default: off)")


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
                   "ours (fast on a CPU) or the report's (224 px, hours on a CPU); options given explicitly "
                   "override it (default: ours)")
    t.add_argument("--resume", metavar="CKPT", help="continue the run saved in CKPT (its last.pt) "
                   "with the options it was started with (default: a new run)")
    optimisation_options(t)
    t.add_argument("--image-size", type=number(int, 1, MAX_IMAGE_SIZE), help="side of the square network input; "
                   "images are resized to it once, when decoded (default: per network and recipe)")
    t.add_argument("--in-channels", type=int, choices=[1, 3],
                   help=f"1 for grayscale, 3 for RGB (default: {D['in_channels']})")
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
    t.add_argument("--skip-bad-images", **SKIP_BAD)
    t.add_argument("--watch-test", action="store_true", default=None,
                   help="also score DATA/test after every epoch into history.csv and curves.png, to measure what "
                        "choosing the epoch on the test set (as the report did) would flatter; never used to choose "
                        "the epoch or anything else: the one exception to `test` alone reading it (default: off)")
    t.add_argument("--compile", action="store_true", help="torch.compile the network (default: off)")
    t.add_argument("--dry-run", action="store_true",
                   help="a run of one epoch (a one-epoch schedule, whatever --epochs says) to check a set-up; "
                        "its checkpoints are marked as a dry run's, and any later train may replace them")
    runtime_options(t)
    workers_option(t)
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
    s.add_argument("--save-dir", metavar="DIR",
                   help="write metrics.json, confusion_matrix.png and mistakes.png to DIR (default: none)")
    s.add_argument("--mistakes", type=number(int, 1), default=32,
                   help="how many mistakes mistakes.png shows (default: %(default)s)")
    s.add_argument("--labels", choices=["fer2013", "ferplus"], default="fer2013",
                   help="score against the folders' (FER2013's) labels, or against the FER+ crowd majority "
                        "(more than half of ten votes) of each face that the manifest gives one, matched by class and "
                        "file name; prints how many faces it used (default: %(default)s)")
    s.add_argument("--manifest", default=MANIFEST,
                   help="the manifest with the FER+ votes (default: data/fer5_manifest.csv beside fer.py)")
    s.set_defaults(func=cmd_test)


def build_parser():
    p = Parser(prog="fer.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    for add in (add_train, add_evaluation):
        add(sub)
    return p


def resume_hint(args):
    """What a Ctrl-C of `train` leaves: the last completed epoch, and how to go on."""
    last = Path(args.out or "") / "last.pt"
    if args.command != "train" or not args.out or not last.is_file():
        return ""
    return f"; {last} holds the last completed epoch: continue with python fer.py train --resume {last}"


def main(argv=None):
    args, extra = build_parser().parse_known_args(argv)
    if extra:  # argparse would blame `fer.py`: the command's parser says it, naming the command
        Parser(prog=f"fer.py {args.command}").error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return common.guard(f"fer.py {args.command}", lambda: args.func(args), lambda: resume_hint(args))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
