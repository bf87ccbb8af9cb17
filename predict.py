#!/usr/bin/env python
"""Class probabilities of faces: image files, folders of them, or faces found in photos.

    python predict.py samples/                                  # the shipped model
    python predict.py photo.jpg --save-dir out/                 # boxes and classes drawn on the photo
    python predict.py face.jpg --checkpoint runs/resnet34/best.pt
    python predict.py faces/ --checkpoint a.pt --checkpoint b.pt --tta flip   # an ensemble

Finding faces in whole photos needs the optional OpenCV (see DETECTOR_INSTALL);
without it, each picture is classified whole, as a face crop.
"""
import common  # first: it makes Ctrl-C while torch loads one line, not a traceback
import argparse
import os
import sys
from pathlib import Path

import torch
from PIL import Image

import fer
import pictures
from common import IMG_EXTENSIONS, FerError, make_folder, number, write_json
from fer import ensemble_arch, ensemble_probs, image_transform, member_dict, member_inputs, open_image, read_image
from runtime import log

# What predict uses without --checkpoint: GoogLeNet trained on FER2013's faces of the
# five classes (4.8 times fer5's), better on validation than the fer5 checkpoints
# (RESULTS.md, "The users' model"); the report's task keeps checkpoints/resnet34_fer5_224.pt.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "googlenet_fer2013-5class_64.pt"
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


def find_images(paths):
    """Image files of PATHs in order, each once; folders searched recursively."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            # Hidden entries (.ipynb_checkpoints/, macOS ._face.jpg) are not faces.
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise FerError(f"folder {p} has no images ({' '.join(IMG_EXTENSIONS)}); "
                               "give a folder of pictures, or the pictures themselves")
            files += found
        elif p.suffix.lower() == ".pt":  # the old `--checkpoint a.pt b.pt`: b.pt came here
            raise FerError(f"{p} is a checkpoint, not a picture; repeat --checkpoint for each checkpoint "
                           f"of an ensemble: --checkpoint a.pt --checkpoint {p}")
        elif p.is_file():
            files.append(p)
        else:
            raise FerError(f"{p} does not exist; give image files or folders of images")
    return list(dict.fromkeys(files))  # a file given twice (or inside a given folder too) is one row


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


def read_faces(files, cascade, detect, inputs, skip_bad=False):
    """(file, box) of every face predict classifies, and their images decoded for each
    input of the members: {(size, channels): N x C x S x S uint8}. A picture that cannot
    be decoded stops predict, or with --skip-bad-images is left out and counted."""
    faces, images, bad = [], {key: [] for key in inputs}, []
    for f in files:
        try:
            photo, boxes = faces_to_classify(f, cascade, detect)
            decoded = {key: [face_image(f, photo, box, *key) for box in boxes] for key in images}
        except common.UNREADABLE_IMAGE as e:
            if not skip_bad:
                raise FerError(f"cannot read image {f} ({e}); remove it, or pass --skip-bad-images") from None
            bad.append(f)
            continue
        for key in images:
            images[key] += decoded[key]
        faces += [(f, box) for box in boxes]
    if bad:
        note(f"skipped {len(bad)} unreadable image(s), first {bad[0]}")
    check_faces_found([f for f in files if f not in bad], faces)
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
    args.checkpoint = args.checkpoint or [DEFAULT_CHECKPOINT]
    files = find_images(args.paths)  # a wrong path fails before the model loads
    cascade = face_detector(args.detect)  # and so does --detect without OpenCV
    rt, members = fer.evaluation_setup(args)
    classes = members[0].ckpt["classes"]
    faces, images = read_faces(files, cascade, args.detect, member_inputs(members), args.skip_bad_images)
    probs, _ = ensemble_probs(members, images, rt, args.batch_size, args.tta)
    results = prediction_rows(faces, probs, classes, args.top)
    log_prediction_table(results, classes)
    write_json(args.json, dict(arch=ensemble_arch(members), tta=args.tta, classes=classes,
                               members=[member_dict(m) for m in members], predictions=results))
    if args.save_dir:
        make_folder(args.save_dir, "--save-dir")
        picture = pictures.draw_predictions(images[members[0].input], results, classes)
        pictures.save_png(picture, Path(args.save_dir) / "predictions.png", "--save-dir")
        log(f"wrote {Path(args.save_dir) / 'predictions.png'}")
        save_photos(args.save_dir, results)
    return results


def save_photos(save_dir, results):
    """DIR/<name>_faces.png: each photo in which faces were found, annotated by draw_faces."""
    written = set()
    for f in dict.fromkeys(r["file"] for r in results if r["box"]):
        name, n = f"{Path(f).stem}_faces.png", 1
        while name.casefold() in written:  # a/x.jpg, b/x.jpg, x_2.jpg: x_faces, x_2_faces, x_2_2_faces
            n += 1
            name = f"{Path(f).stem}_{n}_faces.png"
        written.add(name.casefold())  # X.jpg and x.jpg: one file on case-insensitive disks
        picture = pictures.draw_faces(open_image(f, 3), [r for r in results if r["file"] == f])
        pictures.save_png(picture, Path(save_dir) / name, "--save-dir")
        log(f"wrote {Path(save_dir) / name}")


def build_parser():
    r = common.script_parser("predict.py", __doc__)
    r.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    r.add_argument("--checkpoint", action="append", metavar="CKPT",
                   help="a .pt file written by fer.py train or export; repeat it for an ensemble, which averages "
                        "the class probabilities (default: checkpoints/googlenet_fer2013-5class_64.pt, the "
                        "shipped five-class model)")
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
    r.add_argument("--tta", **fer.TTA)
    r.add_argument("--batch-size", type=number(int, 1), default=128, help="(default: %(default)s)")
    r.add_argument("--json", metavar="PATH", help="also write the predictions as JSON to PATH (default: print only)")
    r.add_argument("--skip-bad-images", **fer.SKIP_BAD)
    fer.runtime_options(r)
    r.set_defaults(device="cpu")
    return r


def main(argv=None):
    return common.run_script("predict.py", build_parser(), cmd_predict, argv, intermixed=True)


if __name__ == "__main__":
    main()
