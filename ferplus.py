"""FER+ (Barsoum et al. 2016): ten crowd votes per FER2013 face, in the fer5 manifest
as ferplus_<name> columns, and `fer.py test --labels ferplus`, which scores a model
against the crowd's majority instead of FER2013's single label."""
from dataclasses import replace
from pathlib import Path

import torch

from common import FerError, read_manifest

# FER+'s ten vote columns (Barsoum et al. 2016, in the manifest as ferplus_<name>) and
# the class folder each one means; "unknown" and "NF" (not a face) name no expression.
FERPLUS_CLASSES = {"neutral": "neutral", "happiness": "happy", "surprise": "surprise", "sadness": "sad",
                   "anger": "angry", "disgust": "disgust", "fear": "fear", "contempt": "contempt",
                   "unknown": None, "NF": None}


# FER+ asked ten annotators about each face.
ANNOTATORS = 10


def majority(row):
    """(class, None) when more than half of a manifest row's FER+ votes chose one
    expression, else (None, why). A plurality is not enough: FER+'s own "majority"
    scheme keeps a label only when most of the ten annotators agree on it."""
    cells = {k: (row.get(f"ferplus_{k}") or "0").strip() for k in FERPLUS_CLASSES}
    # ten annotators: each count is a whole number 0-10, and together they are at most ten
    if not all(v.isascii() and v.isdigit() and int(v) <= ANNOTATORS for v in cells.values()) \
            or sum(map(int, cells.values())) > ANNOTATORS:
        shown = ", ".join(f"{k} {v!r}" for k, v in cells.items() if v != "0")
        raise FerError(f"the manifest's FER+ votes of {row.get('file')} ({shown}) are not whole numbers from 0 to "
                       f"{ANNOTATORS} adding up to at most {ANNOTATORS}; use the shipped data/fer5_manifest.csv "
                       "(git checkout data/fer5_manifest.csv)")
    votes = {k: int(v) for k, v in cells.items()}
    top = max(votes, key=votes.get)
    if not any(votes.values()):
        return None, "FER+ has no votes for it"
    if 2 * votes[top] <= sum(votes.values()):
        return None, "no expression has more than half of its FER+ votes"
    if FERPLUS_CLASSES[top] is None:
        return None, f"most FER+ votes say {'not a face' if top == 'NF' else 'unknown'}"
    return FERPLUS_CLASSES[top], None


def rescore(faces, probs, manifest):
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
        label, why = majority(row) if row else (None, "not in the manifest")
        if label is not None and label not in faces.classes:
            label, why = None, "the FER+ majority is a class the checkpoint lacks"
        if label is None:
            left_out[why] = left_out.get(why, 0) + 1
        else:
            labels[i] = faces.classes.index(label)
    keep = labels >= 0
    if not keep.any():
        raise FerError(f"none of the {len(labels)} test faces has a clear FER+ majority in {manifest} "
                       "(faces are matched by class and file name); --labels ferplus needs fer5's or "
                       "FER2013's test faces")
    pred = probs.argmax(1)
    wrong = pred != faces.labels
    sided = int((wrong & (pred == labels)).sum())
    fer2013_accuracy = float((~wrong[keep]).float().mean())  # on the same faces, for comparison
    print(f"labels: the FER+ majority, for {int(keep.sum())} of {len(labels)} faces; left out: "
        + ("; ".join(f"{n} ({why})" for why, n in left_out.items()) or "none"))
    print(f"against FER2013's labels: accuracy {fer2013_accuracy:.4f} on these {int(keep.sum())} faces; "
        f"{int(wrong.sum())} mistakes on all {len(labels)}, on {sided} of which the FER+ majority chose "
        "the model's answer")
    extra = dict(labels="ferplus", faces_scored=int(keep.sum()), left_out=left_out,
                 fer2013_accuracy_on_scored=fer2013_accuracy, fer2013_label_mistakes=int(wrong.sum()),
                 mistakes_where_ferplus_agrees_with_model=sided)
    scored = replace(faces, images=faces.images[keep], labels=labels[keep],
                     files=[f for f, k in zip(faces.files, keep) if k])
    return scored, keep, extra
