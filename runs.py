"""Run folders and checkpoint files, the one format everywhere: what `fer.py train`
writes after every epoch (last.pt with all --resume needs, best.pt with the weights
only, history.csv, curves.png), and how every command loads a checkpoint: safely
(weights_only, so pickled code never runs), on any device (map_location), with its
sizes checked before a network is built, older checkpoints filled in, and another
run's folder never overwritten."""
import warnings
import zipfile
from pathlib import Path

import torch

from common import FerError, write_file
from nets import MODELS
from pictures import draw_curves, save_png

# Checkpoint fields every command relies on.
CHECKPOINT_KEYS = ("arch", "classes", "image_size", "in_channels", "state_dict", "args")
# What checkpoints saved before a field or option existed lack, and the value their run
# had: the one place that knows older checkpoints (the shipped ones among them).
# (They were all trained with the report's normalisation, mean 0.5 and std 0.5.)
OLDER_CHECKPOINTS = dict(mean=0.5, std=0.5, weights="raw", epoch=None, dry_run=False)
OLDER_RUNS = dict(mixup=0.0, recipe="ours", ema=None, classes=None, watch_test=False)


# The largest input side and number of classes a checkpoint or an option may ask for:
# FER faces are 48 px and the report's input 224, so 1,024 is room to spare, and larger
# sizes only allocate gigabytes before failing.
MAX_IMAGE_SIZE, MAX_CLASSES = 1024, 1000


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
    save_png(draw_curves(state["history"], state["best_epoch"]), out / "curves.png", "--out")


def load_checkpoint(path):
    """A checkpoint dict, loaded safely: weights_only=True refuses pickled code, and
    map_location='cpu' lets a GPU checkpoint load on any machine. Its sizes are checked
    before any network is built, and what an older checkpoint lacks is filled in."""
    path = Path(path)
    if not path.is_file():
        # an empty folder: the --out of a run stopped before its first epoch ended
        unfinished = path.suffix == ".pt" and path.parent.is_dir() and not any(path.parent.iterdir())
        raise FerError(f"checkpoint {path} does not exist" + (
            f"; {path.parent} holds no checkpoint: its run stopped before its first epoch ended, so train again"
            if unfinished else "; give the .pt file written by `fer.py train`"))
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for bad files
        raise unreadable(path, e) from None
    check_checkpoint(ckpt, path)
    for k, v in OLDER_CHECKPOINTS.items():
        ckpt.setdefault(k, v)
    for k, v in OLDER_RUNS.items():
        ckpt["args"].setdefault(k, v)
    ckpt["args"].setdefault("split_seed", ckpt["args"].get("seed"))  # --seed moved the split then
    return ckpt


def unreadable(path, e):
    """The error for a file torch.load refused: unsafe (pickled code or pickle features
    the weights-only loader does not run), or damaged."""
    text = str(e)
    fix = "use the .pt file written by `fer.py train` or `export.py`"
    with open(path, "rb") as f:  # a pickle starts with its PROTO opcode, torch's zip format with PK
        pickled = f.read(2) in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or zipfile.is_zipfile(path)
    if "GLOBAL" in text or "Unsupported global" in text or (pickled and "Unsupported operand" in text):
        what = text.split("GLOBAL", 1)[1].split()[0] if "GLOBAL" in text else "pickle opcodes it does not run"
        return FerError(f"{path} was refused as unsafe: it holds pickled Python code ({what}), which weights_only "
                        f"loading never runs, so none of it ran; {fix}")
    # the cause, not torch's advice on weights_only; an empty file raises with no message
    text = text.split("WeightsUnpickler error:", 1)[-1].strip() or "no message"
    reason = ("empty file" if path.stat().st_size == 0
              else f"{type(e).__name__}: {text.splitlines()[0].split('. ')[0][:200]}")
    return FerError(f"{path} is not a readable checkpoint, damaged or truncated ({reason}); {fix}")


def check_checkpoint(ckpt, path):
    """Refuse a checkpoint whose fields no network here can use, before anything is built
    from them (an absurd image size would allocate gigabytes first)."""
    fix = "use the .pt file written by `fer.py train` or `export.py`"
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise FerError(f"{path} is not a fer checkpoint (it lacks {', '.join(missing)}); {fix}")
    arch, size, classes = ckpt["arch"], ckpt["image_size"], ckpt["classes"]
    if arch not in MODELS:
        raise FerError(f"{path} holds an unknown network {arch!r}; {fix} (networks: {', '.join(sorted(MODELS))})")
    if not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_SIZE:  # build_model checks the network's minimum
        raise FerError(f"{path} asks for {size!r} px images, not 1-{MAX_IMAGE_SIZE}; {fix}")
    if ckpt["in_channels"] not in (1, 3):
        raise FerError(f"{path} asks for {ckpt['in_channels']!r} input channels, not 1 or 3; {fix}")
    if (not isinstance(classes, (list, tuple)) or not 2 <= len(classes) <= MAX_CLASSES
            or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes)):
        raise FerError(f"{path} holds no list of 2-{MAX_CLASSES} different class names; {fix}")
    if not isinstance(ckpt["args"], dict) or not isinstance(ckpt["state_dict"], dict):
        raise FerError(f"{path} has no options or weights in the form `fer.py train` writes; {fix}")


def check_out(out, resume):
    """--out must not hold another run (a folder with best.pt or last.pt): train never
    replaces one, unless --resume continues it there. A dry run's checkpoints, which
    only checked a set-up, may be replaced by any run."""
    held = [out / p for p in ("best.pt", "last.pt") if (out / p).is_file()]
    if not held or (resume and Path(resume).resolve().parent == out.resolve()):
        return
    try:  # mmap: only the few fields read here leave the disk, not a 700 MB optimiser state
        info = torch.load(held[0], map_location="cpu", weights_only=True, mmap=True)
        if info.get("dry_run"):
            return
        what = f"{info.get('arch')}, epoch {info.get('epoch')} of {info.get('args', {}).get('epochs')}"
    except Exception:  # noqa: BLE001 - a file we cannot read is still not ours to replace
        what = "a file that is not a readable checkpoint"
    resume_hint = f"continue it with --resume {out / 'last.pt'}, " if (out / "last.pt").is_file() else ""
    raise FerError(f"--out {out} holds another run ({held[0].name}: {what}), which train never replaces; "
                   f"{resume_hint}choose another --out, or delete {out} first")
