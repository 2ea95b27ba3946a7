"""topk_plugin.recipes.texture_synthesis: Gram targets through the core's masks, and a 64 px random-weights run."""
import csv
import json
from pathlib import Path

import pytest
import torch

from topk_plugin.recipes.texture_synthesis import CONDITIONS, main, texture_loss
from topk_plugin.recipes.vgg_features import VGGTaps, build_extractor, gram, load_features, set_topk_mode
from topk_plugin import topk, topk_mask

LAYERS = ["relu1_1", "pool1", "pool2"]


def test_without_topk_grams_use_the_core_non_topk_responses_of_both_images():
    torch.manual_seed(0)
    features, _ = load_features("vgg19", None)
    dense = VGGTaps(features, "vgg19", LAYERS)
    extractor = build_extractor(features, "vgg19", LAYERS, 0.05)
    target, image = torch.rand(1, 3, 40, 40), torch.rand(1, 3, 40, 40)
    assert CONDITIONS == {"with_topk": "identity", "without_topk": "non_topk"}
    set_topk_mode(extractor, "non_topk")
    masked = extractor(target)
    for name, f in dense(target).items():
        assert torch.equal(masked[name], torch.where(topk_mask(f, 0.05), 0.0, f))
    loss = texture_loss(extractor, target, 2.0)(image)
    d_target, d_image = dense(target), dense(image)
    # the authors' GramLossHook: weight / 4 times the summed squared Gram difference, per layer
    expected = sum(2.0 / 4 * (gram(topk(d_image[n], 0.05, mode="non_topk"))
                              - gram(topk(d_target[n], 0.05, mode="non_topk"))).square().sum() for n in LAYERS)
    torch.testing.assert_close(loss, expected)
    set_topk_mode(extractor, "identity")
    assert texture_loss(extractor, target, 1.0)(target).item() == 0.0


def test_random_weights_run_descends_and_writes_marked_outputs(tmp_path, shared_data):
    out = tmp_path / "tex"
    summary = main(["--data", str(shared_data / "few-shot" / "jeep"), "--out", str(out), "--random-weights",
                    "--size", "64", "--steps", "2", "--lbfgs-iters", "2", "--images", "1", "--layers", *LAYERS,
                    "--device", "cpu"])
    assert summary["meaningless"] and summary["weights"] == "random"
    assert json.loads((out / "summary_MEANINGLESS.json").read_text())["meaningless"] is True
    (result,) = summary["images"]
    for condition in CONDITIONS:
        assert result[condition]["final_loss"] < result[condition]["initial_loss"]
    rows = list(csv.DictReader(open(out / "losses_MEANINGLESS.csv")))
    assert len(rows) == len(CONDITIONS) * 3
    last = {r["condition"]: float(r["loss"]) for r in rows if r["step"] == "2"}
    assert last == pytest.approx({c: result[c]["final_loss"] for c in CONDITIONS})
    for name in (result["figure"], "losses_MEANINGLESS.png"):
        assert "MEANINGLESS" in name and (out / name).read_bytes()[:4] == b"\x89PNG"


def _tiny_run(data, out, *extra):
    return ["--data", str(data), "--out", str(out), "--random-weights", "--size", "32", "--steps", "1",
            "--lbfgs-iters", "1", "--layers", "relu1_1", "--device", "cpu", *extra]


@pytest.mark.parametrize("option, message", [
    ([], "--random-weights"), (["--random-weights", "--k", "0"], "--k '0'"),
    (["--random-weights", "--k", "1.5"], "--k '1.5'"), (["--random-weights", "--layers", "pool9"], "pool9"),
    (["--random-weights", "--steps", "0"], "--steps"), (["--random-weights", "--size", "8"], "size=8"),
    (["--random-weights", "--layer-weight", "-1"], "layer_weight=-1"),
    (["--random-weights", "--device", "cuda:7"], "cuda:7"), (["--random-weights", "--data", "/no/such"], "/no/such"),
])
def test_bad_options_fail_before_the_run_touches_anything(tmp_path, shared_data, option, message, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as raised:
        main(["--data", str(shared_data / "few-shot" / "jeep"), "--out", str(out), *option])
    assert message in f"{raised.value}{capsys.readouterr().err}"
    assert not out.exists()


def test_a_finished_run_is_refused_unless_overwritten_and_then_replaced_whole(tmp_path, shared_data):
    data, out = shared_data / "few-shot" / "jeep", tmp_path / "tex"
    first = main(_tiny_run(data, out, "--images", "2"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit, match="--overwrite"):
        main(_tiny_run(data, out, "--images", "1"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    second = main(_tiny_run(data, out, "--images", "1", "--overwrite"))
    (kept,) = second["images"]
    gone = {r["figure"] for r in first["images"]} - {kept["figure"]}
    assert gone and not any((out / name).exists() for name in gone)
    assert json.loads((out / "config.json").read_text())["images"] == 1
    assert {r["label"] for r in csv.DictReader(open(out / "losses_MEANINGLESS.csv"))} == {Path(kept["image"]).stem}
