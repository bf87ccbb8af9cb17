"""export.py: a checkpoint for shipping, the weights only (no optimiser, scheduler or
--ema state), in float16 with --half, which every command loads into float32."""
import json

import fer
from conftest import assert_error


def test_export_half_keeps_the_weights_only_in_float16(tiny_run, tiny_data, tmp_path, call_main):
    run = tiny_run[0]
    code, out, err = call_main("export.py", "--checkpoint", run / "last.pt", "--out", tmp_path / "half.pt", "--half")
    assert code == 0, err
    assert out.startswith(f"wrote {tmp_path / 'half.pt'} (") and out.endswith(" MiB)\n")
    last, half = fer.load_checkpoint(run / "last.pt"), fer.load_checkpoint(tmp_path / "half.pt")
    assert {"optimizer", "scheduler", "scaler"} <= last.keys()
    assert not {"optimizer", "scheduler", "scaler", "ema"} & half.keys()
    assert {k: half[k] for k in ("arch", "classes", "image_size", "epoch")} == \
        {k: last[k] for k in ("arch", "classes", "image_size", "epoch")}
    floats = [v for v in half["state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype.itemsize == 2 for v in floats)
    # best.pt holds the weights only, in float32: the export is about half of it
    assert (tmp_path / "half.pt").stat().st_size < 0.6 * (run / "best.pt").stat().st_size
    face = tiny_data / "test" / "happy" / "000.jpg"
    code, _, err = call_main("predict.py", face, "--checkpoint", tmp_path / "half.pt", "--json", tmp_path / "p.json",
                             "--threads", "1")
    assert code == 0, err
    assert json.loads((tmp_path / "p.json").read_text())["classes"] == last["classes"]


def test_export_checks_its_output_before_reading_the_checkpoint(tiny_run, tmp_path, call_main):
    (tmp_path / "afile").write_text("a file where a folder is needed")
    code, out, err = call_main("export.py", "--checkpoint", tmp_path / "missing.pt",
                               "--out", tmp_path / "afile" / "model.pt")
    assert_error(code, err, f"cannot create --out {tmp_path / 'afile' / 'model.pt'}", "is a file", prog="export.py")
    assert out == "" and (tmp_path / "afile").read_text() == "a file where a folder is needed"


def test_export_makes_the_folders_of_its_output(tiny_run, tmp_path, call_main):
    code, _, err = call_main("export.py", "--checkpoint", tiny_run[0] / "best.pt", "--out", tmp_path / "a" / "b.pt")
    assert code == 0, err
    assert (tmp_path / "a" / "b.pt").is_file()
