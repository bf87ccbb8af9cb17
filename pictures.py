"""Every picture fer.py and predict.py draw, with Pillow: training curves, the
confusion matrix, the test's mistakes, predictions, faces boxed in photos; and the
one writer that saves them. Each drawing's size follows from its arguments, not
from font metrics, so it is the same on every machine."""
import math
from pathlib import Path

import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageFont

from common import write_file


def save_png(picture, path, option="path"):
    """The one PNG writer: atomically (common.write_file), so a failed run leaves an
    earlier picture as it was."""
    write_file(path, lambda f: picture.save(f, format="PNG"), option=option)


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
        panels.append(("test (watched, never used)",
                       [("accuracy", [h["test_accuracy"] for h in history], "steelblue"),
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
        label = f"kept: epoch {mark}"
        width = d.textlength(label, font=font)
        x = px(mark) + 4 if px(mark) + 4 + width <= right else px(mark) - 4 - width  # whole, at the right edge too
        d.text((x, bottom - 20), label, font=font, fill="dimgray")
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
        face = TF.to_pil_image(faces.images[i]).convert("RGB")
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
        img.paste(TF.to_pil_image(face).convert("RGB").resize((tile, tile), Image.BICUBIC), (x, y))
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


def draw_watched(runs, width=480, height=300, font_size=14):
    """One panel per run of `train --watch-test` [(name, history, kept epoch)]:
    validation and test Macro-F1 by epoch, the epoch validation kept marked, side by
    side (two panels a row), so what choosing on the test set would add shows as the gap
    between the test curve's peak and its value at the mark."""
    cols = min(2, len(runs))
    rows = math.ceil(len(runs) / cols)
    img = Image.new("RGB", (cols * width, rows * height), "white")
    d, font = ImageDraw.Draw(img), load_font(font_size)
    for k, (name, history, kept) in enumerate(runs):
        x, y = (k % cols) * width, (k // cols) * height
        series = [("val F1", [h["val_macro_f1"] for h in history], "darkorange"),
                  ("test F1", [h["test_macro_f1"] for h in history], "steelblue")]
        plot_panel(d, (x, y, x + width, y + height), [h["epoch"] for h in history], series, kept, name, font)
    return img
