#!/usr/bin/env python
"""Training and inference images/s: the report's pipeline against ours, each speed-up
on its own, and the network alone on tensors in memory (what no pipeline can beat).

    python bench.py                                  # ResNet34, ours at 64 px, the report's at 224 px
    python bench.py --model vgg11 --image-size 224 --batch-size 32

Prints figures; plan a training run from them (an epoch is 4,500 images on fer5).
"""
import common  # first: it makes Ctrl-C while torch loads one line, not a traceback
import argparse
import itertools
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image

import fer
from common import number
from fer import (OURS, TRAIN_DEFAULTS, build_model, check_image_size, compute_loss,
                 load_faces, make_optimizer, pil_batches, predict_probs, scan_folder, tensor_batches)
from nets import MODELS
from runtime import Runtime, cpu_flags, describe_device, log, setup_runtime

# The CPU features that decide training speed, by their /proc/cpuinfo flag: float32
# runs on AVX2 or AVX-512; bfloat16 is faster than float32 only with native bf16
# instructions (AVX512-BF16, or AMX's tiles on recent Xeons), and far slower without.
CPU_FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}


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
    recipe = {**TRAIN_DEFAULTS, **OURS[args.model]}  # what `train` runs by default
    size = args.image_size or recipe["image_size"]
    batch = args.batch_size or recipe["batch_size"]
    check_image_size(args.model, size)
    check_image_size(args.model, args.report_size, "--report-size")
    n_images = batch * (args.steps + 1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) / "train" if args.data else write_fake_folder(Path(tmp), 2, n_images)
        ours = setup_runtime(args)
        log(f"bench {args.model}, batch {batch}, {args.steps} timed steps after one warm-up "
            f"(precision and layout are training's; inference on a CPU runs in float32), on "
            f"{describe_device(ours.device)}\ntraining precision: {describe_precision(ours, args)}")
        configs = bench_configs(args, ours, size)
        rows = [bench_row(args, root, recipe, batch, n_images, *config) for config in configs]
        default = rows[len(configs) - 1 - args.compile]
        alone = bench_network_alone(args, ours, size, batch, len(scan_folder(root)[0]), recipe)
        log(f"ours / report at {args.report_size}px: {rows[1] / rows[0]:.1f}x training; "
            f"ours at {size}px / report at {args.report_size}px: {default / rows[0]:.1f}x; "
            f"an epoch of 4,500 images at {size}px: about {4500 / default:.0f} s; "
            f"ours / the network alone: {default / alone:.2f} of its speed"
            + (f"; torch.compile: {rows[-1] / default:.2f}x" if args.compile else ""))
    return rows + [alone]


def bench_configs(args, ours, size):
    """(label, runtime, pipeline, size, compiled) of each row: the report's PIL pipeline
    and ours at the report's size; then at the training size every precision x layout
    pair, so each speed-up shows on its own, the last being ours as `train` runs it
    (and, with --compile, once more compiled)."""
    plain = Runtime(ours.device)  # float32, default memory layout
    pairs = dict.fromkeys((amp, cl) for amp in (None, ours.amp_dtype) for cl in (False, ours.channels_last))
    configs = [("report: PIL per image", plain, "pil", args.report_size, False),
               ("ours: in-memory tensors", ours, "tensor", args.report_size, False)]
    configs += [("ours: in-memory tensors", replace(ours, amp_dtype=amp, channels_last=cl), "tensor", size, False)
                for amp, cl in pairs]
    return configs + [("ours + torch.compile", ours, "tensor", size, True)] * args.compile


def bench_row(args, root, recipe, batch, n_images, label, rt, pipeline, size, compiled):
    """One row: training and inference images/s of one configuration, and peak memory."""
    faces = load_faces(root, size, args.in_channels, skip_bad=True, limit=n_images)
    augmentation = {k: recipe[k] for k in ("crop_scale", "rotation", "erasing")}
    opts = argparse.Namespace(**augmentation, image_size=size, in_channels=args.in_channels, workers=args.workers)
    torch.manual_seed(0)
    model = build_model(args.model, len(faces.classes), args.in_channels, size, rt)
    if compiled:  # the warm-up step pays for compilation
        model = torch.compile(model)
    idx = torch.arange(len(faces.labels)).repeat(math.ceil(n_images / len(faces.labels)))
    batches = (pil_batches if pipeline == "pil" else tensor_batches)(faces, idx, batch, opts, rt, 0)
    train_ips = bench_train(model, batches, args.steps, rt, recipe)
    infer_ips = bench_infer(model, faces, rt, batch)
    memory, mib = peak_memory(rt)
    log(f"{label:<24} {size:>4}px  {rt.precision:>8}  channels_last={str(rt.channels_last):<5}  "
        f"train {train_ips:7.1f} img/s  infer {infer_ips:7.1f} img/s  peak {memory} {mib:5.0f} MiB")
    return train_ips


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


def build_parser():
    b = common.script_parser("bench.py", __doc__)
    b.add_argument("--model", choices=sorted(MODELS), default="resnet34", help="network (default: %(default)s)")
    b.add_argument("--data", help="folder with train/<class>/ (default: random images made on the fly)")
    b.add_argument("--image-size", type=number(int, 1, fer.MAX_IMAGE_SIZE),
                   help="our input size (default: the network's recipe)")
    b.add_argument("--report-size", type=number(int, 1, fer.MAX_IMAGE_SIZE), default=224,
                   help="the report's input size (default: %(default)s)")
    b.add_argument("--batch-size", type=number(int, 1), help="(default: the network's recipe)")
    b.add_argument("--steps", type=number(int, 1), default=3,
                   help="timed training steps per pipeline (default: %(default)s)")
    b.add_argument("--in-channels", type=int, choices=[1, 3], default=3, help="(default: %(default)s)")
    b.add_argument("--compile", action="store_true",
                   help="add a row for ours with torch.compile; compiling adds about 40 s "
                        "for ResNet34 on 2 cores (default: off)")
    fer.runtime_options(b)
    fer.workers_option(b)
    return b


def main(argv=None):
    return common.run_script("bench.py", build_parser(), cmd_bench, argv)


if __name__ == "__main__":
    main()
