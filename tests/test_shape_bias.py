"""Shape-bias metrics, the 16-class mapping, the built-in evaluator and the shape-bias recipe."""
import json
import re

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision import transforms

from topk_plugin.integrations import cue_conflict as cc
from topk_plugin.integrations.imagenet16 import CATEGORIES, IMAGENET_INDICES, category_probabilities, decide
from topk_plugin.integrations.shape_bias import (COLUMNS, accuracy, category_shape_bias, read_responses, shape_bias,
                                     shape_or_texture_fraction, shape_texture_fractions, summarize, texture_category)
from topk_plugin import set_k, sparsify
from topk_plugin.models import create_model
from topk_plugin.recipes import shape_bias as recipe
from topk_plugin.recipes._common import seed_everything


# ----------------------------------------------------------------------------- the paper's and humans' CSVs

@pytest.mark.parametrize("run, expected", [("AlexNet-normal", 0.239), ("AlexNet-topK-10", 0.719),
                                           ("VGG-normal", 0.079), ("VGG-topK-5", 0.584)])
def test_paper_shape_bias_from_its_csvs(shared_data, run, expected):
    path = shared_data / "paper-responses" / "cue-conflict" / f"cue-conflict_{run}_session-1.csv"
    assert shape_bias(path) == pytest.approx(expected, abs=5e-4)
    assert shape_bias(pd.read_csv(path)) == shape_bias(str(path))


def test_humans_shape_bias_range(shared_data):
    table = summarize(shared_data / "human-responses" / "cue-conflict")
    assert len(table) == 10
    assert table["shape_bias"].between(0.915, 0.99).all()
    assert table["shape_bias"].min() < 0.925 and table["shape_bias"].max() > 0.985
    assert (table["trials"] == 1200).all()  # 1280 stimuli less the 80 whose cues agree


def test_human_edge_and_silhouette_accuracy(shared_data):
    edge = accuracy(shared_data / "human-responses" / "edge")
    silhouette = accuracy(shared_data / "human-responses" / "silhouette")
    assert 0.8 < edge < 0.95 and 0.7 < silhouette < 0.85


def test_read_responses_accepts_file_folder_list_frame(shared_data, tmp_path):
    folder = shared_data / "human-responses" / "cue-conflict"
    files = sorted(folder.glob("*.csv"))
    from_folder = read_responses(folder)
    from_list = read_responses(files)
    assert len(from_folder) == sum(len(pd.read_csv(f)) for f in files)
    pd.testing.assert_frame_equal(from_folder, from_list)
    assert read_responses(from_folder) is from_folder
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="lacks columns"):
        read_responses(bad)
    with pytest.raises(FileNotFoundError, match="nope"):
        read_responses(tmp_path / "nope.csv")


# ----------------------------------------------------------------------------- metric properties

@pytest.mark.parametrize("name, texture", [("airplane1-bicycle2.png", "bicycle"),
                                           ("0001_s5n_s01_0_bird_00_bird3-bird2.png", "bird")])
def test_texture_category(name, texture):
    assert texture_category(name) == texture


@pytest.mark.parametrize("name", ["0002_edg_s01_0_oven_00_oven10.png", "bird3_bird2.png", "bird-bear.png"])
def test_names_without_both_cues_have_no_texture(name):
    with pytest.raises(ValueError, match="does not end in a cue-conflict stimulus name"):
        texture_category(name)


trial = st.tuples(st.sampled_from(CATEGORIES), st.sampled_from(CATEGORIES), st.sampled_from(CATEGORIES))


def _frame(trials):
    return pd.DataFrame({"subj": "m", "object_response": [r for _, _, r in trials],
                         "category": [s for s, _, _ in trials],
                         "imagename": [f"{s}1-{t}2.png" for s, t, _ in trials]})


@settings(max_examples=60, deadline=None)
@given(st.lists(trial, min_size=1, max_size=60), st.lists(trial, max_size=20))
def test_shape_bias_counts_conflicts_only(trials, extra):
    conflicts = [t for t in trials if t[0] != t[1]]
    same_cue = [(s, s, r) for s, _, r in extra]
    frame = _frame(trials + same_cue)
    if not conflicts:
        with pytest.raises(ValueError, match="no cue-conflict"):
            shape_bias(frame)
        return
    shape = sum(r == s for s, _, r in conflicts)
    texture = sum(r == t for _, t, r in conflicts)
    stats = shape_texture_fractions(frame)
    assert stats["trials"] == len(conflicts)
    assert stats["shape_or_texture"] == pytest.approx((shape + texture) / len(conflicts))
    assert shape_or_texture_fraction(frame) == stats["shape_or_texture"]
    if shape + texture == 0:
        assert pd.isna(stats["shape_bias"])
    else:
        assert stats["shape_bias"] == pytest.approx(shape / (shape + texture))
        assert shape_bias(_frame(conflicts)) == stats["shape_bias"]  # same-cue trials change nothing
        per_category = category_shape_bias(frame)
        assert set(per_category.index) == {s for s, _, _ in conflicts}
        assert per_category.dropna().between(0, 1).all()


# ----------------------------------------------------------------------------- 1000 -> 16 classes

def test_category_table_is_a_partition_of_imagenet_classes(shared_data):
    assert list(CATEGORIES) == sorted(p.name for p in (shared_data / "texture-shape" / "cue-conflict").iterdir())
    indices = [i for c in CATEGORIES for i in IMAGENET_INDICES[c]]
    assert len(indices) == len(set(indices)) == 207
    assert all(0 <= i < 1000 for i in indices)
    assert {c: len(IMAGENET_INDICES[c]) for c in ("dog", "bird", "airplane")} == {"dog": 109, "bird": 49, "airplane": 1}


def test_decision_averages_probabilities_per_category():
    logits = torch.randn(5, 1000, dtype=torch.float64)
    probs = logits.softmax(1)
    expected = torch.stack([probs[:, list(IMAGENET_INDICES[c])].mean(1) for c in CATEGORIES], 1)
    assert torch.allclose(category_probabilities(logits).double(), expected, atol=1e-6)
    # mean, not sum: one class of "knife" at 0.3 beats 109 dog classes at 0.006 each (sum 0.65).
    probabilities = torch.full((1, 1000), 1e-9)
    probabilities[0, 499] = 0.3
    probabilities[0, list(IMAGENET_INDICES["dog"])] = 0.006
    assert decide(probabilities.log()) == ["knife"]
    with pytest.raises(ValueError, match=r"\(N, 1000\)"):
        decide(torch.zeros(2, 10))


# ----------------------------------------------------------------------------- evaluator

def test_preprocessing_matches_the_benchmark_loader(shared_data, tmp_path):
    root = shared_data / "texture-shape" / "cue-conflict"
    stimuli = cc.load_stimuli(root, per_category=1, progress=False)
    assert len(stimuli) == 16 and stimuli.categories == list(CATEGORIES)
    benchmark = transforms.Compose([transforms.ToTensor(), transforms.Normalize(cc.IMAGENET_MEAN, cc.IMAGENET_STD)])
    for i in (0, 7, 15):
        image = Image.open(root / stimuli.categories[i] / stimuli.imagenames[i]).convert("RGB")
        assert torch.equal(cc.normalize(stimuli.images[i:i + 1])[0], benchmark(image))
    # another size takes the benchmark's resize branch
    (tmp_path / "cat").mkdir()
    Image.new("RGB", (300, 260), (10, 200, 30)).save(tmp_path / "cat" / "cat1.png")
    odd = cc.load_stimuli(tmp_path, progress=False)
    resized = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), benchmark])
    assert torch.equal(cc.normalize(odd.images)[0], resized(Image.open(tmp_path / "cat" / "cat1.png").convert("RGB")))
    with pytest.raises(FileNotFoundError, match="stimulus folder"):
        cc.load_stimuli(tmp_path / "missing")


def test_written_csv_is_the_benchmark_raw_data_format(shared_data, tmp_path):
    stimuli = cc.load_stimuli(shared_data / "texture-shape" / "cue-conflict", per_category=2, progress=False)
    decisions = [t for t in (texture_category(n) for n in stimuli.imagenames)]  # a pure texture decider
    frame = cc.responses_frame(decisions, stimuli, "my_model")
    path = cc.write_responses(frame, tmp_path, "cue-conflict")
    assert path == tmp_path / "cue-conflict" / "cue-conflict_my-model_session-1.csv"
    lines = path.read_bytes().decode().split("\r\n")  # csv.writer's line ending, like the benchmark's files
    assert lines[0] == ",".join(COLUMNS)
    assert lines[1] == f"my_model,1,1,NaN,bicycle,airplane,NaN,{stimuli.imagenames[0]}"
    assert shape_bias(path) == 0.0 and shape_or_texture_fraction(path) == 1.0
    with pytest.raises(ValueError, match="decisions for"):
        cc.responses_frame(decisions[:3], stimuli, "x")


# ----------------------------------------------------------------------------- validation of raw-data CSVs

def _csv(tmp_path, rows, name="run.csv"):
    path = tmp_path / name
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(path, index=False)
    return path


def _row(response, category, imagename):
    return ["m", 1, 1, float("nan"), response, category, float("nan"), imagename]


@pytest.mark.parametrize("bad, message", [
    (_row("bear", "bird", "bird1.png"), r"imagename 'bird1\.png' .*<shape><i>-<texture><j>"),
    (_row("bear", "bird", "img_0001.png"), r"imagename 'img_0001\.png'"),
    (_row("bear", "bird", "bird1-bears2.png"),
     r"imagename 'bird1-bears2\.png' has texture 'bears', which is not one of the 16"),
    (_row("bear", "aeroplane", "aeroplane1-bear2.png"), r"category 'aeroplane' is not one of the 16"),
    (_row("bear", "Bear", "bear1-bird2.png"), r"category 'Bear' is not one of the 16"),
    (_row("Bear", "bird", "bird1-bear2.png"), r"object_response 'Bear' is not one of the 16"),
    (_row("bear", "bird", "cat1-bear2.png"), r"imagename 'cat1-bear2\.png' has shape 'cat' but category 'bird'"),
])
def test_malformed_shape_bias_tables_are_refused_naming_file_and_line(tmp_path, bad, message):
    path = _csv(tmp_path, [_row("bird", "bird", "bird1-bear2.png"), bad])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 3: {message}"):
        shape_bias(path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 3: {message}"):
        summarize(tmp_path)
    with pytest.raises(ValueError, match=rf"DataFrame row 1: {message}"):
        shape_bias(pd.read_csv(path))


def test_missing_and_no_response_decisions_count_as_neither_cue(tmp_path):
    path = _csv(tmp_path, [_row("bird", "bird", "bird1-bear2.png"), _row("na", "bird", "bird1-cat2.png"),
                           _row(float("nan"), "bird", "bird2-cat2.png")])
    assert shape_texture_fractions(path) == {"shape": 1 / 3, "texture": 0.0, "shape_or_texture": 1 / 3,
                                             "shape_bias": 1.0, "trials": 3}


def test_accuracy_needs_no_cue_conflict_names_but_checks_categories(tmp_path):
    ok = _csv(tmp_path, [_row("oven", "oven", "0002_edg_s01_0_oven_00_oven10.png"), _row("cat", "dog", "dog1.png")])
    assert accuracy(ok) == 0.5
    bad = _csv(tmp_path, [_row("oven", "ovens", "ovens1.png")], "bad.csv")
    with pytest.raises(ValueError, match=r"bad\.csv, line 2: category 'ovens'"):
        accuracy(bad)


# ----------------------------------------------------------------------------- a clean install

def test_integrations_import_without_pandas_and_tqdm_and_say_which_extra(tmp_path, monkeypatch):
    import importlib
    import sys

    import topk_plugin.integrations as package
    for name in ("shape_bias", "cue_conflict"):
        monkeypatch.delitem(sys.modules, f"topk_plugin.integrations.{name}")
        monkeypatch.setattr(package, name, getattr(package, name))  # restored after the test
    monkeypatch.setitem(sys.modules, "pandas", None)  # makes `import pandas` fail
    monkeypatch.setitem(sys.modules, "tqdm", None)
    metrics = importlib.import_module("topk_plugin.integrations.shape_bias")
    evaluator = importlib.import_module("topk_plugin.integrations.cue_conflict")
    with pytest.raises(ImportError, match=r'pandas.*pip install "topk-plugin\[integrations\]"'):
        metrics.shape_bias("any.csv")
    with pytest.raises(ImportError, match=r'tqdm.*pip install "topk-plugin\[integrations\]"'):
        evaluator.load_stimuli(_stimulus(tmp_path, "bird", "bird1-cat1.png").parent.parent)


# ----------------------------------------------------------------------------- stimulus folders

def _stimulus(folder, category, name, size=(224, 224)):
    (folder / category).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(folder / category / name)
    return folder / category / name


def test_truncated_stimulus_is_named_or_skipped(tmp_path):
    _stimulus(tmp_path, "bird", "bird1-cat1.png")
    bad = _stimulus(tmp_path, "cat", "cat1-bird1.png")
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(cc.UnreadableStimulus, match=rf"{bad}"):
        cc.load_stimuli(tmp_path, "cue-conflict", progress=False)
    stimuli = cc.load_stimuli(tmp_path, "cue-conflict", progress=False, skip_bad_images=True)
    assert stimuli.imagenames == ["bird1-cat1.png"] and stimuli.skipped == [str(bad)]


@pytest.mark.parametrize("category, name, message", [
    ("aeroplane", "aeroplane1-bird1.png", r"folder 'aeroplane' .* not one of the 16"),
    ("bird", "photo.png", r"bird/photo\.png.*<shape><i>-<texture><j>"),
    ("bird", "cat1-bird2.png", r"bird/cat1-bird2\.png.*shape 'cat'"),
])
def test_cue_conflict_folder_is_checked_before_decoding(tmp_path, monkeypatch, category, name, message):
    _stimulus(tmp_path, category, name)
    monkeypatch.setattr(cc, "_decode", lambda path: pytest.fail("decoded before the folder was checked"))
    with pytest.raises(ValueError, match=message):
        cc.load_stimuli(tmp_path, "cue-conflict", progress=False)


# ----------------------------------------------------------------------------- the recipe, end to end
# Two tiny models (a torchvision and a timm one) keep these runs to seconds.
TINY = ["shufflenet_v2_x0_5", "timm/test_convnext"]


def _recipe(data, out, *extra):
    return recipe.main(["--smoke", "--per-category", "1", "--datasets", "cue-conflict", "--humans", "none",
                        "--paper", "none", "--data", str(data), "--out", str(out), *extra])


def test_a_non_topk_run_is_named_and_compared_as_one(shared_data, tmp_path):
    """--mode non_topk (the paper's "Revert"): its own run names, and the paper's Revert runs beside it."""
    result = recipe.main(["--smoke", "--per-category", "1", "--datasets", "cue-conflict", "--humans", "none",
                          "--data", str(shared_data / "texture-shape"), "--out", str(tmp_path / "run"),
                          "--k", "0.1", "--mode", "non_topk"])
    assert [r["run"] for r in result["runs"]] == ["alexnet_dense", "alexnet_topk10_non_topk"]
    revert = shape_bias(shared_data / "paper-responses" / "cue-conflict" / "cue-conflict_AlexNet-topK-10-Revert_session-1.csv")
    assert result["paper_shape_bias"]["AlexNet"]["10"] == pytest.approx(revert)
    assert result["paper_shape_bias"]["AlexNet"]["dense"] == pytest.approx(
        shape_bias(shared_data / "paper-responses" / "cue-conflict" / "cue-conflict_AlexNet-normal_session-1.csv"))
    assert "VGG" not in result["paper_shape_bias"]  # the paper recorded no VGG Revert runs
    assert "the Top-K removed" in recipe._k_axis([0.1], "non_topk")[1]
    assert "the Top-K kept" in recipe._k_axis([0.1], "topk")[1]


def test_recipe_compares_models_on_stimuli_decoded_once(shared_data, tmp_path, monkeypatch, capsys):
    seed_everything(3)
    checkpoint = tmp_path / "shufflenet.pth"
    torch.save({"state_dict": create_model(TINY[0]).state_dict()}, checkpoint)
    decoded = []
    monkeypatch.setattr(cc, "_decode", lambda path, decode=cc._decode: decoded.append(path) or decode(path))
    out = tmp_path / "run"
    result = recipe.main(["--smoke", "--model", ",".join(TINY), "--preset", "stage-ends", "--k", "0.1",
                          "--weights", f"{TINY[0]}={checkpoint}", "--per-category", "1",
                          "--datasets", "cue-conflict,edge", "--data", str(shared_data / "texture-shape"),
                          "--out", str(out)])
    assert len(decoded) == len(set(decoded)) == 32  # 16 cue-conflict + 16 edge images, once for 2 models x 2 runs
    err = capsys.readouterr().err
    assert "MEANINGLESS" in err and "timm/test_convnext" in err and TINY[0] not in err.split("MEANINGLESS")[0]
    summary = pd.read_csv(out / "summary.csv")
    assert list(zip(summary["model"], summary["run"])) == [
        (TINY[0], "shufflenet_v2_x0_5_dense"), (TINY[0], "shufflenet_v2_x0_5_topk10"),
        (TINY[1], "timm_test_convnext_dense"), (TINY[1], "timm_test_convnext_topk10")]
    assert list(summary["weights"]) == [str(checkpoint)] * 2 + ["random init"] * 2
    assert result["random_weights"] == [TINY[1]] and result["meaningless"]
    for row in summary.itertuples():
        csv = out / "responses" / "cue-conflict" / cc.csv_name("cue-conflict", row.run)
        assert shape_texture_fractions(csv)["shape_or_texture"] == pytest.approx(row.shape_or_texture)
        assert accuracy(out / "responses" / "edge" / cc.csv_name("edge", row.run)) == pytest.approx(row.edge_accuracy)
    for stem in ("shape_bias_vs_k", "frontier", "per_category"):
        for suffix in ("png", "pdf"):
            assert (out / f"{stem}.{suffix}").stat().st_size > 5000
    assert result["paper_shape_bias"]["AlexNet"]["10"] == pytest.approx(0.719, abs=5e-4)
    assert result["paper_shape_bias"]["VGG"]["dense"] == pytest.approx(0.079, abs=5e-4)
    assert set(pd.read_csv(out / "per_category.csv").columns) >= {"category", "humans", *summary["run"]}
    assert json.loads((out / "config.json").read_text())["weights"] == {TINY[0]: str(checkpoint), TINY[1]: None}
    # the written decisions are those of the checkpoint's model, stage ends, K = 10%
    model = set_k(sparsify(create_model(TINY[0], weights=str(checkpoint)).eval(), "stage-ends"), 0.1)
    stimuli = cc.load_stimuli(shared_data / "texture-shape" / "cue-conflict", per_category=1, progress=False)
    written = pd.read_csv(out / "responses" / "cue-conflict" / cc.csv_name("cue-conflict", summary["run"][1]))
    assert written["object_response"].tolist() == cc.evaluate(model, stimuli, progress=False)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the recipe builds a model or decodes an image."""
    monkeypatch.setattr(recipe, "create_model", lambda *a, **k: pytest.fail("built a model before refusing"))
    monkeypatch.setattr(cc, "_decode", lambda path: pytest.fail("decoded an image before refusing"))


def _refusal(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        recipe.main(argv)
    message = capsys.readouterr().err + (exc.value.code if isinstance(exc.value.code, str) else "")
    assert exc.value.code != 0
    return message


@pytest.mark.parametrize("options, named", [
    (["--k", "0"], "'0'"), (["--k", "1.5"], "'1.5'"), (["--k=-0.1"], "'-0.1'"), (["--k", "nan"], "'nan'"),
    (["--k", ""], "''"), (["--k", "0.1,,0.2"], "'0.1,,0.2'"), (["--batch-size", "0"], "0"),
    (["--per-category", "0"], "0"), (["--preset", "nosuch"], "--preset 'nosuch'"),
    (["--device", "cuda:7"], "--device 'cuda:7'"), (["--device", "tpu"], "--device 'tpu'"),
    (["--model", "alexnet,alexnet"], "['alexnet'] more than once"),
    (["--model", "alexnet,timm/alexnet", "--weights", "vgg16=DEFAULT"], "'vgg16' is not one of --model"),
    (["--weights", "alexnet=DEFAULT,alexnet=IMAGENET1K_V1"], "gives 'alexnet' twice"),
    (["--weights", "weights/missing.pth"], "weights/missing.pth: no such checkpoint file"),
    (["--datasets", "edge"], "--datasets 'edge' must list cue-conflict"),
    (["--datasets", "cue-conflict,sketch"], "--datasets sketch"),
    (["--humans", "nowhere"], "--humans nowhere holds no cue-conflict folder"),
    (["--positions", ""], "--positions ''"), (["--positions", "features.2,,features.5"], "empty position"),
])
def test_bad_options_are_refused_before_any_work(shared_data, tmp_path, no_work, capsys, options, named):
    argv = ["--data", str(shared_data / "texture-shape"), "--out", str(tmp_path / "run"), *options]
    assert named in _refusal(argv, capsys)
    assert not (tmp_path / "run").exists()


def test_out_file_and_non_checkpoint_weights_are_refused_before_any_work(shared_data, tmp_path, no_work, capsys):
    data = ["--data", str(shared_data / "texture-shape")]
    (tmp_path / "file").write_text("x")
    assert "--out " + str(tmp_path / "file") in _refusal([*data, "--out", str(tmp_path / "file")], capsys)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    message = _refusal([*data, "--out", str(tmp_path / "run"), "--weights", str(tmp_path / "notes.txt")], capsys)
    assert f"--weights alexnet={tmp_path / 'notes.txt'}" in message and len(message.strip().splitlines()) == 1


@pytest.mark.parametrize("options, named", [
    (["--model", "no_such_net"], "--model no_such_net"),
    (["--model", TINY[0], "--preset", "paper"], "--model shufflenet_v2_x0_5 --preset 'paper'"),
    (["--model", TINY[0], "--positions", "no.such.layer"], "--model shufflenet_v2_x0_5 --positions"),
])
def test_models_and_placements_are_checked_before_decoding(shared_data, tmp_path, monkeypatch, capsys, options,
                                                           named):
    monkeypatch.setattr(cc, "_decode", lambda path: pytest.fail("decoded an image before refusing"))
    argv = ["--data", str(shared_data / "texture-shape"), "--out", str(tmp_path / "run"), *options]
    assert named in _refusal(argv, capsys)


def test_wrong_architecture_checkpoint_is_refused_before_decoding(shared_data, tmp_path, monkeypatch, capsys):
    path = tmp_path / "mobilenet.pth"
    torch.save(create_model("mobilenet_v3_small").state_dict(), path)
    monkeypatch.setattr(cc, "_decode", lambda path: pytest.fail("decoded an image before refusing"))
    message = _refusal(["--data", str(shared_data / "texture-shape"), "--out", str(tmp_path / "run"),
                        "--model", TINY[0], "--weights", str(path)], capsys)
    assert f"--weights {TINY[0]}={path}" in message and "missing" in message


def _stimuli_with_a_truncated_cat(shared_data, folder):
    """One cue-conflict image per category, copied; the cat's is cut short."""
    for category in CATEGORIES:
        source = sorted((shared_data / "texture-shape" / "cue-conflict" / category).iterdir())[1]
        (folder / "cue-conflict" / category).mkdir(parents=True)
        (folder / "cue-conflict" / category / source.name).write_bytes(source.read_bytes())
    bad = next((folder / "cue-conflict" / "cat").iterdir())
    bad.write_bytes(bad.read_bytes()[:300])
    return bad


def test_bad_image_stops_the_recipe_naming_it(shared_data, tmp_path):
    bad = _stimuli_with_a_truncated_cat(shared_data, tmp_path / "stimuli")
    with pytest.raises(cc.UnreadableStimulus, match=re.escape(str(bad))):
        _recipe(tmp_path / "stimuli", tmp_path / "run", "--model", TINY[0], "--preset", "stage-ends", "--k", "0.1")


def test_a_rerun_never_mixes_with_the_earlier_run(shared_data, tmp_path, capsys):
    """--skip-bad-images leaves the bad file out; a rerun into a finished --out is refused, --overwrite replaces."""
    bad = _stimuli_with_a_truncated_cat(shared_data, tmp_path / "stimuli")
    out = tmp_path / "run"
    options = ["--model", TINY[0], "--preset", "stage-ends", "--skip-bad-images"]
    result = _recipe(tmp_path / "stimuli", out, *options, "--k", "0.1")
    assert result["skipped_images"] == [str(bad)] and result["images"] == {"cue-conflict": 15}
    assert str(bad) in capsys.readouterr().err
    before = {p.name: p.read_bytes() for p in (out / "responses" / "cue-conflict").iterdir()}
    with pytest.raises(SystemExit, match=r"already holds an earlier run.*--overwrite"):
        _recipe(tmp_path / "stimuli", out, *options, "--k", "0.3")
    assert {p.name: p.read_bytes() for p in (out / "responses" / "cue-conflict").iterdir()} == before
    _recipe(tmp_path / "stimuli", out, *options, "--k", "0.3", "--overwrite")
    assert sorted(p.name for p in (out / "responses" / "cue-conflict").iterdir()) == [
        "cue-conflict_shufflenet-v2-x0-5-dense_session-1.csv", "cue-conflict_shufflenet-v2-x0-5-topk30_session-1.csv"]
    assert pd.read_csv(out / "summary.csv")["run"].tolist() == ["shufflenet_v2_x0_5_dense",
                                                                "shufflenet_v2_x0_5_topk30"]
    assert json.loads((out / "config.json").read_text())["ks"] == [0.3]


def test_weights_option_forms():
    models = ["alexnet", "vgg16"]
    assert recipe.parse_weights(None, models) == {"alexnet": None, "vgg16": None}
    assert recipe.parse_weights("DEFAULT", models) == {"alexnet": "DEFAULT", "vgg16": "DEFAULT"}
    assert recipe.parse_weights("vgg16=a/b.pth", models) == {"alexnet": None, "vgg16": "a/b.pth"}
    assert recipe.parse_weights("alexnet=DEFAULT, vgg16=IMAGENET1K_V1", models) == {"alexnet": "DEFAULT",
                                                                                   "vgg16": "IMAGENET1K_V1"}
    with pytest.raises(SystemExit, match="one value for every model, or MODEL=WEIGHTS"):
        recipe.parse_weights("DEFAULT,IMAGENET1K_V1", models)
    with pytest.raises(SystemExit, match="'alexnet' is not MODEL=WEIGHTS"):
        recipe.parse_weights("vgg16=DEFAULT,alexnet", models)
