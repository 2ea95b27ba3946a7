"""Shape-bias metrics, the 16-class mapping, the built-in evaluator and the shape-bias recipe."""
import json

import pandas as pd
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision import transforms

from topk_plugin.integrations import cue_conflict as cc
from topk_plugin.integrations.imagenet16 import CATEGORIES, IMAGENET_INDICES, category_probabilities, decide
from topk_plugin.integrations.shape_bias import (COLUMNS, accuracy, category_shape_bias, read_responses, shape_bias,
                                     shape_or_texture_fraction, shape_texture_fractions, summarize, texture_category)
from topk_plugin.recipes import shape_bias as recipe
from topk_plugin.recipes._common import seed_everything
from topk_plugin import sparsify


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
                                           ("0001_s5n_s01_0_bird_00_bird3-bird2.png", "bird"),
                                           ("0002_edg_s01_0_oven_00_oven10.png", "oven")])
def test_texture_category(name, texture):
    assert texture_category(name) == texture


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


# ----------------------------------------------------------------------------- the recipe, end to end

def test_recipe_runs_the_whole_pipeline(shared_data, tmp_path, capsys):
    out = tmp_path / "run"
    result = recipe.main(["--smoke", "--per-category", "1", "--k", "0.1,0.5", "--datasets", "cue-conflict,edge",
                          "--data", str(shared_data / "texture-shape"), "--out", str(out), "--batch-size", "8"])
    assert "MEANINGLESS" in capsys.readouterr().err
    assert [r["run"] for r in result["runs"]] == ["alexnet_dense", "alexnet_topk10", "alexnet_topk50"]
    assert result["images"] == {"cue-conflict": 16, "edge": 16}
    assert result["paper_shape_bias"]["10"] == pytest.approx(0.719, abs=5e-4)
    for stem in ("shape_bias_vs_k", "per_category", "shape_bias_vs_accuracy"):
        for suffix in ("png", "pdf"):
            assert (out / f"{stem}.{suffix}").stat().st_size > 5000
    summary = pd.read_csv(out / "summary.csv")
    for row in summary.itertuples():
        csv = out / "responses" / "cue-conflict" / cc.csv_name("cue-conflict", row.run)
        assert shape_texture_fractions(csv)["shape_or_texture"] == pytest.approx(row.shape_or_texture)
        assert accuracy(out / "responses" / "edge" / cc.csv_name("edge", row.run)) == pytest.approx(row.edge_accuracy)
    assert json.loads((out / "summary.json").read_text())["model"] == "alexnet"
    assert "humans" in pd.read_csv(out / "per_category.csv").columns
    # the decisions are those of the same seeded random AlexNet with the paper placement at K = 10%
    seed_everything(0)
    model = sparsify(torchvision.models.alexnet(), "paper", k=0.1)
    stimuli = cc.load_stimuli(shared_data / "texture-shape" / "cue-conflict", per_category=1, progress=False)
    written = pd.read_csv(out / "responses" / "cue-conflict" / "cue-conflict_alexnet-topk10_session-1.csv")
    assert written["object_response"].tolist() == cc.evaluate(model, stimuli, progress=False)


def test_build_model_from_a_local_checkpoint(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.alexnet()
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    loaded = recipe.build_model("alexnet", str(path))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))
    with pytest.raises(SystemExit, match="no such checkpoint"):
        recipe.build_model("alexnet", str(tmp_path / "missing.pth"))
    with pytest.raises(SystemExit, match="neither a torchvision nor a timm"):
        recipe.build_model("no_such_net", None)
    with pytest.raises(SystemExit, match="--k 'abc' must be a fraction"):
        recipe.parse_ks("0.1,abc")
