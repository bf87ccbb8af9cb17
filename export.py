#!/usr/bin/env python
"""A checkpoint for shipping: the weights only (no optimiser, scheduler or --ema
state, which only --resume needs), in float16 with --half (half the size; the
networks load it into float32).

    python export.py --checkpoint runs/resnet34/best.pt --out resnet34_fer5_64.pt --half
"""
import common  # first: it makes Ctrl-C while torch loads one line, not a traceback
from pathlib import Path

from common import check_writable
from runs import load_checkpoint, save_checkpoint, weights_only


def cmd_export(args):
    check_writable(args.out, "--out")
    ckpt = load_checkpoint(args.checkpoint)
    state = weights_only(ckpt)
    if args.half:
        state["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    save_checkpoint(state, args.out)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 2**20:.1f} MiB)")


def build_parser():
    e = common.script_parser("export.py", __doc__)
    e.add_argument("--checkpoint", required=True, help="a .pt file written by fer.py train")
    e.add_argument("--out", required=True, help="the file to write")
    e.add_argument("--half", action="store_true", help="store weights in float16, half the size (default: float32)")
    return e


def main(argv=None):
    return common.run_script("export.py", build_parser(), cmd_export, argv)


if __name__ == "__main__":
    main()
