#!/usr/bin/env python
"""What choosing the epoch on the test set flatters, from runs of `fer.py train
--watch-test`: for each run, the epoch validation chose (what best.pt keeps) with its
test figures, the epoch the test set would choose by accuracy (the earliest on a tie,
as the report chose), with its figures, and the difference; with --figure, a PNG of
validation and test Macro-F1 by epoch, one panel a run.

    python optimism.py runs/report_resnet34 runs/report_alexnet --figure figures/report_recipe.png
"""
import common  # first: it makes Ctrl-C while starting one line, not a traceback
import csv
from pathlib import Path

import pictures
from common import FerError, check_writable

WATCHED = ("epoch", "val_accuracy", "val_macro_f1", "seconds", "test_accuracy", "test_macro_f1")


def read_history(run):
    """The rows of RUN/history.csv, numbers as numbers; refused unless --watch-test wrote them."""
    path = Path(run) / "history.csv"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FerError(f"cannot read {path} ({e}); give the --out folder of a `fer.py train` run") from None
    if not rows or not set(WATCHED) <= set(rows[0]):
        raise FerError(f"{path} has no test figures; train the run with --watch-test")
    try:
        return [{k: int(r[k]) if k == "epoch" else float(r[k]) for k in WATCHED} for r in rows]
    except ValueError:
        raise FerError(f"{path} holds a figure that is not a number; it was changed by hand: train again") from None


def choices(history):
    """(the epoch validation Macro-F1 chose, the epoch test accuracy would choose): the
    earliest best of each, as best.pt keeps the first epoch to reach a new best."""
    val = max(history, key=lambda h: (h["val_macro_f1"], -h["epoch"]))
    test = max(history, key=lambda h: (h["test_accuracy"], -h["epoch"]))
    return val, test


def cmd_optimism(args):
    if args.figure:
        check_writable(args.figure, "--figure")
    panels, histories = [], [read_history(run) for run in args.runs]  # all refusals before any output
    print(f"{'run':<28} {'epochs':>6} {'train min':>9}  {'val chose':>9} {'test acc':>8} {'test F1':>7}  "
          f"{'test chose':>10} {'test acc':>8} {'test F1':>7}  {'+acc':>6} {'+F1':>6}")
    for run, history in zip(args.runs, histories):
        val, test = choices(history)
        minutes = sum(h["seconds"] for h in history) / 60
        print(f"{Path(run).name:<28} {len(history):>6} {minutes:>9.0f}  {val['epoch']:>9} {val['test_accuracy']:>8.3f} "
              f"{val['test_macro_f1']:>7.3f}  {test['epoch']:>10} {test['test_accuracy']:>8.3f} "
              f"{test['test_macro_f1']:>7.3f}  {test['test_accuracy'] - val['test_accuracy']:>+6.3f} "
              f"{test['test_macro_f1'] - val['test_macro_f1']:>+6.3f}")
        panels.append((Path(run).name, history, val["epoch"]))
    if args.figure:
        pictures.save_png(pictures.draw_watched(panels), args.figure, "--figure")
        print(f"wrote {args.figure}")


def build_parser():
    p = common.script_parser("optimism.py", __doc__)
    p.add_argument("runs", nargs="+", metavar="RUN", help="--out folders of `fer.py train --watch-test` runs")
    p.add_argument("--figure", metavar="PNG", help="also draw validation and test Macro-F1 by epoch (default: none)")
    return p


def main(argv=None):
    return common.run_script("optimism.py", build_parser(), cmd_optimism, argv)


if __name__ == "__main__":
    main()
