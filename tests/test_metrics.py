import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from metrics import (classification_metrics, confusion_matrix,  # noqa: E402
                     format_confusion_matrix, format_report)


def pairs_to_labels(pairs):
    """Expand {(true, pred): count} into y_true, y_pred tensors."""
    y_true, y_pred = [], []
    for (t, p), n in pairs.items():
        y_true += [t] * n
        y_pred += [p] * n
    return torch.tensor(y_true), torch.tensor(y_pred)


# Worked example, rows true, columns predicted:
#        p0 p1 p2 | support
#   t0 [  2  1  1 ]   4
#   t1 [  0  3  0 ]   3
#   t2 [  1  1  1 ]   3
#   predicted: 3  5  2, total 10, correct 2 + 3 + 1 = 6
CM3 = [[2, 1, 1], [0, 3, 0], [1, 1, 1]]


def test_confusion_matrix_three_classes():
    y_true, y_pred = pairs_to_labels({(0, 0): 2, (0, 1): 1, (0, 2): 1, (1, 1): 3,
                                      (2, 0): 1, (2, 1): 1, (2, 2): 1})
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.dtype == torch.long
    assert cm.shape == (3, 3)
    assert cm.tolist() == CM3


def test_metrics_three_classes():
    m = classification_metrics(torch.tensor(CM3))
    # precision = tp / column sum, recall = tp / row sum
    # F1 = 2 tp / (2 tp + fp + fn): class 0: 4 / (4 + 1 + 2) = 4/7,
    # class 1: 6 / (6 + 2 + 0) = 3/4, class 2: 2 / (2 + 1 + 2) = 2/5
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["precision"] == pytest.approx([2 / 3, 3 / 5, 1 / 2])
    assert m["recall"] == pytest.approx([2 / 4, 3 / 3, 1 / 3])
    assert m["f1"] == pytest.approx([4 / 7, 3 / 4, 2 / 5])
    assert m["support"] == [4, 3, 3]
    assert m["macro_f1"] == pytest.approx((4 / 7 + 3 / 4 + 2 / 5) / 3)


def test_class_never_predicted():
    # Class 2 has two true samples but is never predicted:
    #   t0 [1 0 0], t1 [0 1 0], t2 [1 1 0]; column sums 2, 2, 0
    # precision 1/2, 1/2, 0 (0/0 -> 0); recall 1, 1, 0
    # F1 = 2/3, 2/3, 0 (P + R = 0 -> 0); macro over all 3 classes = 4/9
    cm = confusion_matrix(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 0]), 3)
    m = classification_metrics(cm)
    assert m["precision"] == pytest.approx([1 / 2, 1 / 2, 0.0])
    assert m["recall"] == pytest.approx([1.0, 1.0, 0.0])
    assert m["f1"] == pytest.approx([2 / 3, 2 / 3, 0.0])
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert m["accuracy"] == pytest.approx(2 / 4)


def test_class_absent_from_labels():
    # Class 2 has no true samples but is predicted once:
    #   t0 [1 0 1], t1 [0 1 0], t2 [0 0 0]
    # recall of class 2 is 0/0 -> 0, support 0, precision 0/1 = 0, F1 0
    # class 0: P 1, R 1/2, F1 2/3; class 1: all 1; macro = (2/3 + 1 + 0) / 3
    cm = confusion_matrix(torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1]), 3)
    m = classification_metrics(cm)
    assert m["support"] == [2, 1, 0]
    assert m["recall"] == pytest.approx([1 / 2, 1.0, 0.0])
    assert m["precision"] == pytest.approx([1.0, 1.0, 0.0])
    assert m["f1"] == pytest.approx([2 / 3, 1.0, 0.0])
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_perfect_predictions():
    y = torch.tensor([0, 1, 2, 3, 3, 1])
    m = classification_metrics(confusion_matrix(y, y, 4))
    assert m["accuracy"] == pytest.approx(1.0)
    for key in ("precision", "recall", "f1"):
        assert m[key] == pytest.approx([1.0] * 4)
    assert m["macro_f1"] == pytest.approx(1.0)
    assert m["support"] == [1, 2, 1, 2]


def test_empty_matrix_accuracy_is_zero():
    m = classification_metrics(torch.zeros(3, 3, dtype=torch.long))
    assert m["accuracy"] == 0.0
    assert m["macro_f1"] == 0.0


def test_orientation_rows_are_true():
    # Two samples of class 0 predicted as class 1: they land in row 0, column 1.
    cm = confusion_matrix(torch.tensor([0, 0]), torch.tensor([1, 1]), 2)
    assert cm.tolist() == [[0, 2], [0, 0]]
    assert classification_metrics(cm)["support"] == [2, 0]


@pytest.mark.parametrize("y_true, y_pred", [([0, 3], [0, 1]), ([0, 1], [0, -1])])
def test_labels_out_of_range_raise(y_true, y_pred):
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor(y_true), torch.tensor(y_pred), 3)


CLASSES = ["angry", "happy", "neutral"]


def test_format_report():
    m = classification_metrics(torch.tensor(CM3))
    report = format_report(m, CLASSES)
    assert "precision" in report and "recall" in report and "f1-score" in report
    for name in CLASSES:
        assert name in report
    acc_line = next(l for l in report.splitlines() if l.strip().startswith("accuracy"))
    macro_line = next(l for l in report.splitlines() if l.strip().startswith("macro avg"))
    assert f"{6 / 10:.3f}" in acc_line
    assert f"{(4 / 7 + 3 / 4 + 2 / 5) / 3:.3f}" in macro_line
    assert macro_line.split()[-1] == "10"  # total support


def test_format_confusion_matrix():
    table = format_confusion_matrix(torch.tensor(CM3), CLASSES)
    lines = table.splitlines()
    assert "rows: true, columns: predicted" in lines[0]
    # title, column header, then one line per true class
    header, rows = lines[1], lines[2:]
    assert header.split() == CLASSES
    assert len(rows) == len(CLASSES)
    assert [r.split()[0] for r in rows] == CLASSES
    assert [r.split()[1:] for r in rows] == [[str(v) for v in r] for r in CM3]
    # aligned: every line of the table body has the same width
    assert len({len(l) for l in lines[1:]}) == 1
