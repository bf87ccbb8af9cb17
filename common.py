"""What fer.py and its scripts share, without torch (prepare.py needs none): the
one-line errors and how a script reports them, argparse's number checks, atomic
writes, and the fer5 manifest with its FER+ votes."""
import argparse
import csv
import json
import math
import os
import signal
import struct
import sys
from contextlib import suppress
from pathlib import Path

# torchvision's IMG_EXTENSIONS, here so that prepare.py runs without torch
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# The programs of this folder; each imports this module before torch.
SCRIPTS = ("fer.py", "predict.py", "bench.py", "prepare.py", "export.py", "optimism.py")
# The fer5 split, face by face (file, SHA-256, fer2013.csv row): shipped beside fer.py.
MANIFEST = Path(__file__).resolve().parent / "data" / "fer5_manifest.csv"


def _interrupted_while_starting(*_):
    sys.stderr.write(f"{Path(sys.argv[0]).name}: interrupted while starting; nothing was written\n")
    os._exit(130)


# Run as one of SCRIPTS, Ctrl-C while torch loads (seconds on a small CPU) prints one
# line and exits 130, not a traceback; `guard` restores Python's handler once the
# imports are done. Imported by anything else (pytest, a user's program), nothing changes.
_main = Path(getattr(sys.modules.get("__main__"), "__file__", None) or ".").resolve()
if _main.parent == Path(__file__).resolve().parent and _main.name in SCRIPTS:
    signal.signal(signal.SIGINT, _interrupted_while_starting)

from PIL import Image  # noqa: E402  (after the handler: Pillow, too, takes a moment to load)

# What Pillow raises for a picture it cannot decode (a damaged file, SyntaxError and
# struct.error from some damaged PNGs and TIFFs, a mode that cannot become RGB or L, a
# decompression bomb): every command refuses those, or leaves them out with --skip-bad-images.
UNREADABLE_IMAGE = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError,
                    Image.DecompressionBombWarning)


class FerError(Exception):
    """A mistake in the user's input: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, not argparse's usage block: what is wrong and where to look."""
        if message.startswith("unrecognized arguments") and ".pt" in message:  # --checkpoint a.pt b.pt
            message += "; --checkpoint takes one file: repeat it for an ensemble (--checkpoint a.pt --checkpoint b.pt)"
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


def write_file(path, write, what="", option="path"):
    """`write(f)` into a temporary file renamed over `path`, so a full disk or an
    interrupt leaves an earlier `path` intact. Through a Python file, so a full disk
    raises OSError(ENOSPC) rather than torch's zip-writer RuntimeError; fsync before
    the rename, so the new file is complete on disk."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # --json out/p.json beside --save-dir out
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


def write_json(path, obj):
    if path:
        write_file(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def check_writable(path, option, folder=False):
    """Before any work: `path` (a file, or with folder=True a folder) can be written, so a
    command does not fail at its end after replacing some of its outputs."""
    path = Path(path)
    if path.exists():
        if path.is_dir() != folder:
            raise FerError(f"{option} {path} is a {'file' if folder else 'folder'}; give a "
                           f"{'folder' if folder else 'file'} path, or choose another {option}")
        target = path if folder else path.parent
    else:
        target = next(p for p in path.absolute().parents if p.exists())  # write_file makes the rest
        if not target.is_dir():
            raise FerError(f"cannot create {option} {path}: {target} is a file; choose another {option}")
    if not os.access(target, os.W_OK):
        raise FerError(f"{option} {path}: {target} is not writable; choose another {option}")


def make_folder(path, option):
    """mkdir -p, with a one-line error naming the option that chose the folder."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = "a file has that name" if isinstance(e, FileExistsError) else e.strerror
        raise FerError(f"cannot create {option} folder {path} ({reason}); choose another {option}") from None


def read_manifest(path):
    """The manifest's rows: split, class, file, sha256, fer2013_row (and FER+ votes).
    UTF-8, with a byte-order mark accepted: a spreadsheet program that saves it writes one."""
    fix = "restore it (git checkout data/fer5_manifest.csv)"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows, columns = list(reader), reader.fieldnames or []
    except OSError as e:
        raise FerError(f"cannot read the fer5 manifest {path} ({e.strerror}); it ships with fer.py "
                       f"as data/fer5_manifest.csv: {fix}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise FerError(f"the fer5 manifest {path} is not a UTF-8 CSV ({e}); {fix}") from None
    missing = {"split", "class", "file", "sha256", "fer2013_row"} - set(columns)
    if not columns:
        raise FerError(f"the fer5 manifest {path} is empty; {fix}")
    if missing:
        raise FerError(f"the fer5 manifest {path} lacks the columns {', '.join(sorted(missing))}; {fix}")
    if not rows:
        raise FerError(f"the fer5 manifest {path} has its header but no rows; {fix}")
    return rows


def script_parser(prog, doc):
    """A script's parser: the first paragraph of its docstring as the description,
    the usage examples and tables of the help kept as written."""
    return Parser(prog=prog, description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)


def run_script(prog, parser, command, argv=None, intermixed=False):
    """A script's main: parse ARGV, then `command(args)` under `guard`. `intermixed`:
    positional arguments may stand on both sides of the options (predict's pictures)."""
    args = parser.parse_intermixed_args(argv) if intermixed else parser.parse_args(argv)
    return guard(prog, lambda: command(args))


def guard(prog, run, interrupted=lambda: ""):
    """A script's body `run()` with the one-line form of every refusal: `PROG: error:
    <what is wrong>; <how to fix it>` and exit 2 for a FerError, `PROG: interrupted`
    (and what `interrupted()` adds) and exit 130 for Ctrl-C."""
    with suppress(ValueError):  # not the main thread: nothing to restore
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run()
    except FerError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{interrupted()}", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `... | head` closed the pipe: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(0)
