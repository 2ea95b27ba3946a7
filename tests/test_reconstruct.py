"""topk_plugin.recipes.reconstruct: targets masked by the core's Top-K, and a 64 px random-weights run."""
import csv
import json

import torch

from topk_plugin.recipes.reconstruct import CONDITIONS, main, masked_targets, reconstruction_loss
from topk_plugin.recipes.vgg_features import VGGTaps, build_extractor, load_features
from topk_plugin import topk, topk_layers, topk_mask


def test_targets_are_the_core_masks_of_the_true_activation():
    torch.manual_seed(0)
    features, _ = load_features("vgg16", None)
    extractor = build_extractor(features, "vgg16", ["pool2"], 0.1)
    target = torch.rand(1, 3, 40, 40)
    x = VGGTaps(features, "vgg16", ["pool2"])(target)["pool2"]
    mask = topk_mask(x, 0.1)
    assert CONDITIONS == {"identity": "identity", "topk_only": "topk", "non_topk_only": "non_topk"}
    expected = {"identity": x, "topk": torch.where(mask, x, 0.0), "non_topk": torch.where(mask, 0.0, x)}
    for mode in CONDITIONS.values():
        got = masked_targets(extractor, target, mode)["pool2"]
        assert torch.equal(got, topk(x, 0.1, mode=mode)) and torch.equal(got, expected[mode]), mode
        assert {layer.mode for layer in topk_layers(extractor).values()} == {"identity"}


def test_loss_compares_the_unmasked_image_with_the_masked_target():
    torch.manual_seed(0)
    features, _ = load_features("vgg16", None)
    extractor = build_extractor(features, "vgg16", ["relu2_1"], 0.1)
    target = torch.rand(1, 3, 32, 32)
    x = masked_targets(extractor, target, "identity")["relu2_1"]
    scale = {"relu2_1": x.square().sum()}
    assert reconstruction_loss(extractor, {"relu2_1": x}, scale)(target).item() == 0.0
    topk_only = masked_targets(extractor, target, "topk")
    expected = topk(x, 0.1, mode="non_topk").square().sum() / scale["relu2_1"]
    torch.testing.assert_close(reconstruction_loss(extractor, topk_only, scale)(target), expected)


def test_smoke_descends_on_random_weights_and_writes_marked_outputs(tmp_path):
    summary = main(["--smoke", "--out", str(tmp_path), "--device", "cpu"])
    assert summary["config"]["random_weights"] and summary["config"]["size"] == 64
    assert summary["config"]["layers"] == ("pool2",)
    assert json.loads((tmp_path / "summary_MEANINGLESS.json").read_text())["meaningless"] is True
    (result,) = summary["reconstructions"]
    for condition in CONDITIONS:
        assert result[condition]["final_loss"] < result[condition]["initial_loss"]
    rows = list(csv.DictReader(open(tmp_path / "losses_MEANINGLESS.csv")))
    steps = summary["config"]["steps"] + 1
    assert [r["condition"] for r in rows] == [c for c in CONDITIONS for _ in range(steps)]
    assert {r["layer"] for r in rows} == {result["layer"]}
    for name in ("reconstruction_MEANINGLESS", "losses_MEANINGLESS"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert (tmp_path / f"{name}.pdf").read_bytes()[:4] == b"%PDF"


def test_smoke_keeps_the_options_given_on_the_command_line(tmp_path):
    summary = main(["--smoke", "--out", str(tmp_path), "--device", "cpu", "--layers", "relu1_1", "--size", "32",
                    "--steps", "1"])
    assert {k: summary["config"][k] for k in ("layers", "size", "steps", "lbfgs_iters", "images")} == {
        "layers": ("relu1_1",), "size": 32, "steps": 1, "lbfgs_iters": 2, "images": 1}
