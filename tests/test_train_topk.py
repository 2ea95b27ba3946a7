import csv
import json

import pytest
import torch
from PIL import Image

from topk_plugin.recipes.train_topk import ActivationL1, build_model, main, make_spec, paper_resnet18, parse_k
from topk_plugin.recipes.datasets import SUBSETS, held_out_split, load_splits
from topk_plugin import get_preset, topk_layers


def _folder(root, classes, per_class=3, size=20):
    for i, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            Image.new("RGB", (size, size + j), (40 * i, 10 * j, 90)).save(root / name / f"{name}_{j}.png")
    return root


def test_model_is_the_papers_resnet18_and_matches_the_preset():
    model = paper_resnet18(10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    preset = get_preset("paper", model)
    assert preset.arch == "resnet18" and list(preset.spec.positions) == ["layer2"] and preset.spec.k == 0.2


@pytest.mark.parametrize("variant, mode", [("topk", "topk"), ("mean_replace", "mean_replace"), ("l1", "identity")])
def test_variants_insert_topk_after_layer2_with_their_mode(variant, mode):
    spec = make_spec("paper", None, paper_resnet18(4))
    layers = topk_layers(build_model(variant, spec, 4))
    assert list(layers) == ["layer2"]
    assert layers["layer2"].mode == mode and layers["layer2"].k == 0.2
    assert not hasattr(build_model("dense", spec, 4), "topk_layers")


def test_l1_penalty_is_lambda_times_mean_abs_activation_after_layer2():
    spec = make_spec("paper", None, paper_resnet18(4))
    model = build_model("l1", spec, 4).train()
    penalty = ActivationL1(model, lam=2.5)
    x = torch.randn(3, 3, 32, 32)
    logits = model(x)
    dense = paper_resnet18(4)
    dense.load_state_dict(model.state_dict())
    dense.train()
    seen = []
    dense.layer2.register_forward_hook(lambda m, a, out: seen.append(out))
    assert torch.allclose(dense(x), logits, atol=1e-5)  # identity Top-K: the L1 model computes the dense function
    assert torch.allclose(penalty.pop(), 2.5 * seen[0].abs().mean(), rtol=1e-5)
    with torch.no_grad():
        model.eval()(x)
    assert penalty.terms == []  # evaluation adds nothing to the penalty


def test_k_override_and_positions():
    assert parse_k("5") == 5 and isinstance(parse_k("5"), int) and parse_k("0.25") == 0.25
    with pytest.raises(SystemExit, match="--k 'ten'"):
        parse_k("ten")
    spec = make_spec("layer1,layer3", parse_k("5"), paper_resnet18(4))
    assert spec.positions == ["layer1", "layer3"] and spec.k == 5
    with pytest.raises(SystemExit, match="layer9.*matches no module"):
        make_spec("layer9", None, paper_resnet18(4))
    with pytest.raises(SystemExit, match="fraction and must lie in"):
        make_spec("paper", 1.5, paper_resnet18(4))


def test_held_out_split_is_disjoint_seeded_and_covers_every_image(tmp_path):
    root = _folder(tmp_path / "data", ["b", "a"], per_class=10)
    first, again = held_out_split(root, 0.2, seed=3), held_out_split(root, 0.2, seed=3)
    assert first.classes == ["a", "b"] and first == again
    assert len(first.val) == 4 and len(first.train) == 16
    assert not {p for p, _ in first.train} & {p for p, _ in first.val}
    capped = first.limit(3, seed=0)
    assert [label for _, label in capped.train].count(0) == 3 and len(capped.val) == 4


def test_subset_selects_wnids_in_place(tmp_path):
    wnids = SUBSETS["in-s2"]
    for split in ("train", "val"):
        _folder(tmp_path / split, [*wnids, "n99999999"], per_class=1)
    splits = load_splits(tmp_path, "in-s2")
    assert splits.classes == list(wnids) and len(splits.train) == 10
    assert all(str(p).startswith(str(tmp_path / "val")) for p, _ in splits.val)


@pytest.mark.parametrize("layout, argv, message", [
    ("none", [], "data folder not found"),
    ("mismatch", [], r"class mismatch .* only in train \['b'\], only in val \['c'\]"),
    ("wnids", ["--subset", "in-s1"], r"lacks 9 of the 10 requested classes"),
    ("ok", ["--topk", "layer2,fc9"], r"'fc9' matches no module"),
    ("ok", ["--smoke", "--stylized-val", "missing"], "--stylized-val folder not found"),
    ("ok", [], "AdaIN needs trained weights"),
])
def test_bad_input_exits_with_a_clear_message(tmp_path, layout, argv, message):
    classes = {"mismatch": (["a", "b"], ["a", "c"]), "wnids": (["n01440764"], ["n01440764"]),
               "ok": (["a", "b"], ["a", "b"])}
    if layout in classes:
        _folder(tmp_path / "d" / "train", classes[layout][0])
        _folder(tmp_path / "d" / "val", classes[layout][1])
    argv = [a if a != "missing" else str(tmp_path / "nowhere") for a in argv]
    with pytest.raises(SystemExit, match=message):
        main(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "out"), "--device", "cpu", *argv])


def test_stylized_val_must_hold_the_val_classes(tmp_path):
    _folder(tmp_path / "d" / "train", ["a", "b"])
    _folder(tmp_path / "d" / "val", ["a", "b"])
    _folder(tmp_path / "sty", ["a"])
    with pytest.raises(SystemExit, match=r"lacks classes \['b'\]"):
        main(["--data", str(tmp_path / "d"), "--stylized-val", str(tmp_path / "sty"), "--out", str(tmp_path / "o")])


@pytest.mark.slow
def test_smoke_run_gives_all_six_rows_and_resumes(shared_data, tmp_path):
    out = tmp_path / "run"
    base = ["--smoke", "--data", str(shared_data / "few-shot"), "--styles", str(shared_data / "style-targets"),
            "--out", str(out), "--max-per-class", "2", "--l1-lambdas", "1", "--size", "32", "--resize", "37"]
    result = main(base)

    rows = {r["row"]: r for r in result["table"]}
    assert sorted(rows) == ["(1)", "(2)", "(3)", "(4)", "(5)", "(6)"]
    assert all(0 <= r["val_mean"] <= 100 and 0 <= r["stylized_mean"] <= 100 and r["seeds"] == 1
               for r in result["table"])
    sweep = {r["k"]: r for r in result["sweep"]}
    assert sorted(sweep) == [0.1, 0.2, 0.5]  # the smoke sweep plus the training K
    assert rows["(2)"]["val_mean"] == sweep[0.2]["val_acc"]
    assert rows["(3)"]["val_mean"] == max(r["val_acc"] for r in sweep.values())
    for name in ("curves.png", "curves.pdf", "sweep.png", "table.md", "table.csv", "sweep.csv",
                 "stylized-val/MEANINGLESS.txt", "runs/topk/seed0/last.pt"):
        assert (out / name).is_file(), name
    assert "meaningless" in (out / "table.md").read_text()
    with open(out / "history.csv") as handle:
        history = list(csv.DictReader(handle))
    assert [r["run"] for r in history] == ["dense", "topk", "l1-1", "mean_replace"]
    assert len(list((out / "stylized-val").glob("*/*.png"))) == 8  # 2 held-out images per class, 4 classes
    assert json.loads((out / "config.json").read_text())["classes"] == ["fish", "jeep", "railway", "table"]

    # One more epoch of the Top-K run continues from its checkpoint instead of starting over.
    stamp = (out / "stylized-val" / "manifest.csv").stat().st_mtime_ns
    again = main([*base, "--variant", "topk", "--epochs", "2", "--resume"])
    topk_rows = [r for r in again["history"] if r["run"] == "topk"]
    assert [r["epoch"] for r in topk_rows] == [1, 2]
    assert topk_rows[0] == next(r for r in result["history"] if r["run"] == "topk")
    assert (out / "stylized-val" / "manifest.csv").stat().st_mtime_ns == stamp
    assert torch.load(out / "runs/topk/seed0/last.pt", weights_only=False)["epoch"] == 2
