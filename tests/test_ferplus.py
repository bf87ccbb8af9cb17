"""ferplus.py: the FER+ crowd majority of a face (more than half of its ten votes),
and `fer.py test --labels ferplus`, which scores a model against it with the votes
from a manifest, faces without a clear majority left out and counted."""
import csv
import json

import pytest

import ferplus

VOTES = [f"ferplus_{k}" for k in ferplus.FERPLUS_CLASSES]


def votes(**counts):
    """A manifest row's FER+ columns: the given votes, 0 elsewhere."""
    return {c: str(counts.get(c.removeprefix("ferplus_"), 0)) for c in VOTES}


@pytest.mark.parametrize("counts, expected", [
    (dict(anger=6, sadness=4), ("angry", None)),
    (dict(happiness=10), ("happy", None)),
    (dict(neutral=5, sadness=5), (None, "no expression has more than half of its FER+ votes")),
    (dict(neutral=4, sadness=3, fear=3), (None, "no expression has more than half of its FER+ votes")),
    (dict(NF=8, neutral=2), (None, "most FER+ votes say not a face")),
    (dict(unknown=6, neutral=4), (None, "most FER+ votes say unknown")),
    (dict(fear=7, sadness=3), ("fear", None)),
    (dict(), (None, "FER+ has no votes for it")),
])
def test_ferplus_majority_needs_more_than_half_the_votes(counts, expected):
    assert ferplus.majority(votes(**counts)) == expected


def test_ferplus_majority_reads_empty_vote_cells_as_no_votes():
    assert ferplus.majority({c: "" for c in VOTES}) == (None, "FER+ has no votes for it")


def write_manifest(path, rows):
    fields = ["split", "class", "file", "sha256", "fer2013_row", *VOTES]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        for r in rows:
            w.writerow({"split": "test", "class": "angry", "sha256": "", "fer2013_row": "", **r})


def test_labels_ferplus_scores_the_faces_with_a_clear_majority(tiny_run, tiny_data, tmp_path, call_main):
    ckpt = tiny_run[0] / "best.pt"
    files = sorted((tiny_data / "test").rglob("*.jpg"))
    assert call_main("predict.py", *files, "--checkpoint", ckpt, "--json", tmp_path / "p.json", "--threads", "1")[0] == 0
    pred = [p["prediction"] for p in json.loads((tmp_path / "p.json").read_text())["predictions"]]
    # The crowd chooses the model's answer on every face but four: one tie, one "not a
    # face", one fear (a class the checkpoint lacks), and one face not in the manifest.
    to_ferplus = {v: k for k, v in ferplus.FERPLUS_CLASSES.items() if v}
    rows = [dict(file=f.name, **{"class": f.parent.name}, **votes(**{to_ferplus[p]: 9, "neutral": 1})) for f, p in zip(files, pred)]
    rows[0].update(votes(neutral=5, sadness=5))
    rows[1].update(votes(NF=10))
    rows[2].update(votes(fear=10))
    del rows[3]
    write_manifest(tmp_path / "m.csv", rows)
    code, text, err = call_main("fer.py", "test", "--checkpoint", ckpt, "--data", tiny_data, "--labels", "ferplus",
                               "--manifest", tmp_path / "m.csv", "--json", tmp_path / "t.json", "--threads", "1")
    assert code == 0, err
    result = json.loads((tmp_path / "t.json").read_text())
    n = len(files)
    truth = [f.parent.name for f in files]
    mistakes = sum(p != t for p, t in zip(pred, truth))
    sided = sum(p != t for p, t in list(zip(pred, truth))[4:])
    assert result["labels"] == "ferplus" and result["faces_scored"] == n - 4
    assert result["left_out"] == {"no expression has more than half of its FER+ votes": 1,
                                  "most FER+ votes say not a face": 1,
                                  "the FER+ majority is a class the checkpoint lacks": 1, "not in the manifest": 1}
    assert result["accuracy"] == 1.0 and sum(map(sum, result["confusion_matrix"])) == n - 4
    assert result["fer2013_label_mistakes"] == mistakes
    assert result["mistakes_where_ferplus_agrees_with_model"] == sided
    kept = [p == t for p, t in list(zip(pred, truth))[4:]]
    assert result["fer2013_accuracy_on_scored"] == pytest.approx(sum(kept) / len(kept))
    assert f"for {n - 4} of {n} faces" in text and f"{mistakes} mistakes on all {n}" in text


def test_labels_ferplus_refuses_a_manifest_without_votes_or_matches(tiny_run, tiny_data, tmp_path, call_main):
    ckpt = tiny_run[0] / "best.pt"
    (tmp_path / "novotes.csv").write_text("split,class,file,sha256,fer2013_row\ntest,angry,x.jpg,,\n")
    write_manifest(tmp_path / "other.csv", [dict(file="PrivateTest_1.jpg", **votes(anger=10))])
    for manifest, message in (("novotes.csv", "has no FER+ votes"), ("other.csv", "none of the 12 test faces")):
        code, _, err = call_main("fer.py", "test", "--checkpoint", ckpt, "--data", tiny_data, "--labels", "ferplus",
                                "--manifest", tmp_path / manifest, "--threads", "1")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_ferplus_votes_that_are_not_numbers_are_refused_in_one_line():
    with pytest.raises(ferplus.FerError, match="not whole numbers"):
        ferplus.majority({**votes(anger=6), "ferplus_anger": "six", "file": "x.jpg"})
