"""Classification metrics as pure functions on tensors (no sklearn, no numpy).

Everything is derived from one confusion matrix, so validation, test and the
per-epoch check all report numbers computed the same way.
"""
import torch


def confusion_matrix(y_true, y_pred, num_classes):
    """Count (true, predicted) pairs into a ``[C, C]`` LongTensor.

    Rows are the true class, columns the predicted class (sklearn's layout), so
    ``cm[i, j]`` is the number of samples of class ``i`` predicted as ``j``.
    Raises ``ValueError`` if a label is outside ``[0, num_classes)``.
    """
    y_true = torch.as_tensor(y_true).flatten().long().cpu()
    y_pred = torch.as_tensor(y_pred).flatten().long().cpu()
    if y_true.numel() != y_pred.numel():
        raise ValueError(f"y_true has {y_true.numel()} labels, y_pred has {y_pred.numel()}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.numel() and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} has labels outside [0, {num_classes}): "
                             f"min {y.min().item()}, max {y.max().item()}")
    # One bincount over the flattened pair index is a single vectorised pass;
    # minlength keeps classes that never occur.
    counts = torch.bincount(y_true * num_classes + y_pred, minlength=num_classes ** 2)
    return counts.reshape(num_classes, num_classes)


def _safe_div(num, den):
    # A zero denominator gives 0, matching sklearn's zero_division=0.
    return torch.where(den > 0, num / den.clamp(min=1e-12), torch.zeros_like(num))


def classification_metrics(cm):
    """Accuracy, per-class precision/recall/F1/support and macro-F1 from ``cm``.

    Returns a dict with ``accuracy`` (float), ``precision``, ``recall``, ``f1``
    (lists of floats, one per class), ``support`` (list of ints: true samples
    per class) and ``macro_f1`` (float).

    A zero denominator gives 0: precision of a class that is never predicted,
    recall of a class with no true samples, F1 when precision + recall = 0.
    Macro-F1 is the plain mean of F1 over all C classes, those zeros included
    (sklearn's ``zero_division=0``), so a class the model ignores pulls it down.
    Accuracy of an empty matrix is 0.
    """
    cm = torch.as_tensor(cm).double()
    tp = cm.diag()
    support = cm.sum(dim=1)    # row sums: true samples per class
    predicted = cm.sum(dim=0)  # column sums: predictions per class
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    total = cm.sum()
    accuracy = (tp.sum() / total).item() if total > 0 else 0.0
    return {
        "accuracy": accuracy,
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": [int(s) for s in support.tolist()],
        "macro_f1": f1.mean().item() if f1.numel() else 0.0,
    }


def format_report(metrics, classes, digits=3):
    """Text report in the spirit of sklearn's ``classification_report``.

    One row per class, then ``accuracy`` and ``macro avg`` (unweighted mean of
    precision, recall and F1 over all classes, with the total support).
    """
    width = max(len(c) for c in list(classes) + ["macro avg"])
    head = f"{'':>{width}} {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}"
    row = f"{{:>{width}}} {{:>9.{digits}f}} {{:>9.{digits}f}} {{:>9.{digits}f}} {{:>9}}"
    lines = [head, ""]
    for i, name in enumerate(classes):
        lines.append(row.format(name, metrics["precision"][i], metrics["recall"][i],
                                metrics["f1"][i], metrics["support"][i]))
    total = sum(metrics["support"])
    n = len(classes)
    lines.append("")
    # Accuracy has no precision/recall columns; leave them blank as sklearn does.
    lines.append(f"{'accuracy':>{width}} {'':>9} {'':>9} "
                 f"{metrics['accuracy']:>9.{digits}f} {total:>9}")
    lines.append(row.format("macro avg", sum(metrics["precision"]) / n,
                            sum(metrics["recall"]) / n, metrics["macro_f1"], total))
    return "\n".join(lines)


def format_confusion_matrix(cm, classes):
    """Aligned confusion-matrix table: rows are true classes, columns predicted."""
    cm = torch.as_tensor(cm)
    names = list(classes)
    width = max(max(len(c) for c in names), len(str(int(cm.max()))) if cm.numel() else 1)
    lines = ["rows: true, columns: predicted",
             " " * width + " " + " ".join(f"{c:>{width}}" for c in names)]
    for name, counts in zip(names, cm.tolist()):
        lines.append(f"{name:>{width}} " + " ".join(f"{v:>{width}}" for v in counts))
    return "\n".join(lines)
