"""topk_plugin.recipes._common: run folders never mix, saves are atomic, options fail early, one smoke mechanism."""
import argparse
import json

import pytest
import torch
from PIL import Image

from topk_plugin.recipes import _common as common


def test_prepare_out_marks_a_new_folder(tmp_path):
    out = common.prepare_out(tmp_path / "run")
    assert json.loads((out / common.RUN_MARKER).read_text())["topk_plugin"]


def test_prepare_out_refuses_an_earlier_run(tmp_path):
    out = common.prepare_out(tmp_path / "run")
    (out / "summary.csv").write_text("old")
    with pytest.raises(SystemExit, match="already holds an earlier run.*--resume.*--overwrite"):
        common.prepare_out(out)
    assert (out / "summary.csv").read_text() == "old"


def test_overwrite_clears_only_our_runs(tmp_path):
    out = common.prepare_out(tmp_path / "run")
    (out / "sub").mkdir()
    (out / "sub" / "old.csv").write_text("old")
    common.prepare_out(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [common.RUN_MARKER]
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("precious")
    with pytest.raises(SystemExit, match="not written by these recipes"):
        common.prepare_out(foreign, overwrite=True)
    assert (foreign / "chapter1.tex").read_text() == "precious"


def test_prepare_out_rejects_files_and_contradictions(tmp_path):
    file = tmp_path / "out.txt"
    file.write_text("x")
    with pytest.raises(SystemExit, match="is a file"):
        common.prepare_out(file)
    with pytest.raises(SystemExit, match="contradict"):
        common.prepare_out(tmp_path / "a", resume=True, overwrite=True)
    with pytest.raises(SystemExit, match="holds no run"):
        common.prepare_out(tmp_path / "b", resume=True)


def test_resume_config_is_authoritative(tmp_path):
    out = common.prepare_out(tmp_path / "run")
    common.save_config(out, {"k": 0.2, "epochs": 5, "device": "cpu"})
    assert common.check_resume_config(out, {"k": 0.2, "epochs": 5, "device": "cuda"}, ignore=["device"])["k"] == 0.2
    with pytest.raises(SystemExit, match=r"k: the run has 0\.2, this command gives 0\.5"):
        common.check_resume_config(out, {"k": 0.5, "epochs": 5})


def test_atomic_save_keeps_the_last_good_file_when_a_save_dies(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    common.atomic_save({"epoch": 1}, path)

    def dying_save(obj, f):
        open(f, "wb").write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        common.atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("text", ["", "0", "1.5", "-0.1", "nan", "0.1,,0.2", "a"])
def test_k_list_rejects_bad_values_at_parse_time(text):
    with pytest.raises(argparse.ArgumentTypeError, match="K|comma"):
        common.k_list(text)


def test_k_list_reads_fractions_and_counts():
    assert common.k_list("0.05, 0.1,12") == [0.05, 0.1, 12]
    assert common.k_list("1,1.0") == [1, 1.0]  # a count of 1 and 100%: two different Ks


@pytest.mark.parametrize("text", ["0.1,0.10", "12,12", "0.05,0.2,0.05"])
def test_k_list_refuses_a_k_given_twice(text):
    """A repeated K would be one run counted twice (or a sweep row reusing another's results)."""
    with pytest.raises(argparse.ArgumentTypeError, match="more than once"):
        common.k_list(text)


@pytest.mark.parametrize("text", ["0", "-3", "x"])
def test_positive_int_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        common.positive_int(text)


def test_smoke_keeps_options_the_user_gave():
    parser = common.recipe_parser("demo", "data", "out", trains=True)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--size", type=int, default=224)
    args = common.apply_smoke(parser.parse_args(["--smoke", "--epochs", "50"]), parser, epochs=1, size=32)
    assert (args.epochs, args.size) == (50, 32)
    args = common.apply_smoke(parser.parse_args(["--epochs", "7"]), parser, epochs=1, size=32)
    assert (args.epochs, args.size) == (7, 224)


def test_smoke_sees_options_of_sub_commands():
    parser = common.RecipeParser()
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train")
    common.add_run_options(train, "data", "out", trains=True)
    train.add_argument("--iters", type=int, default=1000)
    train.add_argument("--size", type=int, default=256)
    args = common.apply_smoke(parser.parse_args(["train", "--smoke", "--size", "256"]), parser, iters=2, size=32)
    assert (args.iters, args.size) == (2, 256)


def test_read_image_names_a_truncated_file(tmp_path):
    path = tmp_path / "broken.png"
    Image.new("RGB", (64, 64), "red").save(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(common.UnreadableImage, match="broken.png"):
        common.read_image(path)
    good = tmp_path / "good.png"
    Image.new("L", (8, 8)).save(good)
    assert common.read_image(good).mode == "RGB"


def test_write_csv_takes_the_union_of_columns(tmp_path):
    path = common.write_csv(tmp_path / "rows.csv", [{"a": 1}, {"a": 2, "b": tmp_path}])
    assert path.read_text().splitlines() == ["a,b", "1,", f"2,{tmp_path}"]


@pytest.mark.parametrize("name", ["gpu", "cuda:7", "xla"])
def test_resolve_device_names_bad_values(name):
    if torch.cuda.is_available() and name.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    with pytest.raises(SystemExit, match=name):
        common.resolve_device(name)


def test_a_run_that_stopped_before_writing_results_leaves_a_reusable_folder(tmp_path):
    out = common.prepare_out(tmp_path / "run")
    common.save_config(out, {"k": 0.1})  # then the run died: wrong weights, a bad image...
    assert common.prepare_out(out) == out
    assert not (out / common.CONFIG_FILE).exists()
    with pytest.raises(SystemExit, match="holds no results to resume"):
        common.prepare_out(out, resume=True)
