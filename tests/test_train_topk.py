import dataclasses
import json
import re

import pytest
import torch
from PIL import Image

from topk_plugin import get_preset, topk_layers
from torch.utils.data import DataLoader

from topk_plugin.recipes.datasets import SUBSETS, FileListDataset, bad_images_exit, held_out_split, load_splits
from topk_plugin.recipes.train_topk import (ARCHS, ActivationL1, ModelConfig, main, model_config, parse_args,
                                            resolve_topk, transforms_for)


def _folder(root, classes, per_class=3, size=20):
    for i, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            Image.new("RGB", (size, size + j), (40 * i, 10 * j, 90)).save(root / name / f"{name}_{j}.png")
    return root


def _pair(root, classes=("a", "b"), per_class=2):
    _folder(root / "train", classes, per_class)
    _folder(root / "val", classes, per_class)
    return root


def _smoke(tmp_path, shared_data, out="run", *extra):
    """A smoke command on a tiny train/val pair (2 classes x 2 images) with a ready stylized val: seconds."""
    data = tmp_path / "d"
    if not data.exists():
        _pair(data)
        _folder(tmp_path / "sty", ["a", "b"], per_class=2, size=24)
    return ["--smoke", "--data", str(data), "--stylized-val", str(tmp_path / "sty"), "--out", str(tmp_path / out),
            "--device", "cpu", *extra]


def test_default_network_is_the_authors_resnet18_with_topk_after_layer2():
    args = parse_args([])
    assert args.arch == "resnet18_paper" and args.topk == "paper" and not args.amp
    assert (args.epochs, args.batch_size, args.lr, args.size, args.resize) == (50, 32, 0.1, 224, 256)
    model = ARCHS["resnet18_paper"](10, 224)
    assert model.linear.in_features == 512 * 7 * 7 and hasattr(model.layer2[0], "shortcut")
    spec = resolve_topk("paper", None, model)
    assert spec.positions == ("layer2",) and spec.k == 0.2
    # Smoke runs use 32 px: the head reads the 512 x 1 x 1 map that avg_pool2d(4) leaves there.
    assert ARCHS["resnet18_paper"](4, 32)(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    tv = ARCHS["resnet18_tv"](4, 32)
    assert tv.conv1.kernel_size == (3, 3) and tv.conv1.stride == (1, 1) and isinstance(tv.maxpool, torch.nn.Identity)
    assert resolve_topk("paper", 5, tv).k == 5 and get_preset("paper", tv).spec.positions == ("layer2",)


@pytest.mark.parametrize("variant, mode", [("topk", "topk"), ("mean_replace", "mean_replace"), ("l1", "identity")])
def test_variants_insert_topk_after_layer2_with_their_mode(variant, mode):
    spec = resolve_topk("paper", None, ARCHS["resnet18_paper"](4, 32))
    layers = topk_layers(model_config("resnet18_paper", 4, 32, spec, variant).build())
    assert list(layers) == ["layer2"]
    assert layers["layer2"].mode == mode and layers["layer2"].k == 0.2
    dense = model_config("resnet18_paper", 4, 32, spec, "dense")
    assert dense.topk is None and not hasattr(dense.build(), "topk_layers")


def test_model_config_rebuilds_the_network_from_its_fields():
    spec = resolve_topk("layer1,layer3", 3, ARCHS["resnet18_tv"](4, 32))
    config = model_config("resnet18_tv", 4, 32, spec, "topk")
    stored = json.loads(json.dumps(dataclasses.asdict(config)))  # what a checkpoint keeps: fields, no CLI names
    assert stored["topk"] == {"positions": ["layer1", "layer3"], "k": 3, "mode": "topk", "kind": "spatial",
                              "ties": "first"}
    layers = topk_layers(ModelConfig(**stored).build())
    assert sorted(layers) == ["layer1", "layer3"] and {l.k for l in layers.values()} == {3}


def test_l1_penalty_is_lambda_times_mean_abs_activation_after_layer2():
    spec = resolve_topk("paper", None, ARCHS["resnet18_paper"](4, 32))
    model = model_config("resnet18_paper", 4, 32, spec, "l1").build().train()
    penalty = ActivationL1(model, lam=2.5)
    x = torch.randn(3, 3, 32, 32)
    logits = model(x)
    dense = ARCHS["resnet18_paper"](4, 32)
    dense.load_state_dict(model.state_dict())
    dense.train()
    seen = []
    dense.layer2.register_forward_hook(lambda m, a, out: seen.append(out))
    assert torch.allclose(dense(x), logits, atol=1e-5)  # identity Top-K: the L1 model computes the dense function
    assert torch.allclose(penalty.pop(), 2.5 * seen[0].abs().mean(), rtol=1e-5)
    with torch.no_grad():
        model.eval()(x)
    assert penalty.terms == []  # evaluation adds nothing to the penalty


def test_topk_placement_errors_name_the_option():
    with pytest.raises(SystemExit, match="layer9.*matches no module"):
        resolve_topk("layer9", None, ARCHS["resnet18_paper"](4, 32))


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


@pytest.mark.parametrize("argv, message", [
    (["--k", "0"], r"--k '0'"), (["--k", "1.5"], r"--k '1.5'"), (["--k", "-0.1"], r"--k '-0.1'"),
    (["--k", "nan"], r"--k 'nan'"), (["--k", ""], r"--k ''"),
    (["--sweep-k", "0.1,0"], r"'0'"), (["--batch-size", "0"], r"--batch-size.*0"),
    (["--device", "cuda:7"], r"--device 'cuda:7'"), (["--size", "48"], r"--size 48.*multiple of 32"),
    (["--topk", "layer2,fc9"], r"'fc9' matches no module"), (["--val-fraction", "1.5"], r"--val-fraction 1.5"),
    (["--size", "32", "--resize", "37"], r"AdaIN needs trained weights"),
    (["--seeds", "0", "1", "0"], r"--seeds: 0 is given more than once"),
    (["--l1-lambdas", "0.1", "0.1"], r"--l1-lambdas: 0.1 is given more than once"),
    (["--l1-lambdas", "0.1", "0.1000001"], r"--l1-lambdas: 0.1 and 0.1000001 name the same run"),
])
def test_bad_options_exit_naming_the_value_before_any_work(tmp_path, capsys, argv, message):
    _pair(tmp_path / "d")
    base = ["--data", str(tmp_path / "d"), "--out", str(tmp_path / "out"), "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, *argv])
    assert exit_info.value.code != 0
    assert re.search(message, str(exit_info.value.code) + capsys.readouterr().err)
    assert not (tmp_path / "out").exists()  # nothing written, nothing trained


@pytest.mark.parametrize("layout, argv, message", [
    ("none", [], "data folder not found"),
    ("mismatch", [], r"class mismatch .* only in train \['b'\], only in val \['c'\]"),
    ("wnids", ["--subset", "in-s1"], r"lacks 9 of the 10 requested classes"),
    ("ok", ["--smoke", "--stylized-val", "missing"], "--stylized-val folder not found"),
])
def test_bad_data_exits_with_a_clear_message(tmp_path, layout, argv, message):
    classes = {"mismatch": (["a", "b"], ["a", "c"]), "wnids": (["n01440764"], ["n01440764"]),
               "ok": (["a", "b"], ["a", "b"])}
    if layout in classes:
        _folder(tmp_path / "d" / "train", classes[layout][0])
        _folder(tmp_path / "d" / "val", classes[layout][1])
    argv = [a if a != "missing" else str(tmp_path / "nowhere") for a in argv]
    with pytest.raises(SystemExit, match=message):
        main(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "out"), "--device", "cpu", *argv])


def test_stylized_val_must_hold_the_val_classes(tmp_path):
    _pair(tmp_path / "d")
    _folder(tmp_path / "sty", ["a"])
    with pytest.raises(SystemExit, match=r"lacks classes \['b'\]"):
        main(["--data", str(tmp_path / "d"), "--stylized-val", str(tmp_path / "sty"), "--out", str(tmp_path / "o")])


def test_out_naming_a_file_and_weights_that_do_not_fit_are_refused_first(tmp_path, shared_data):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SystemExit, match=r"--out .*file.txt is a file"):
        main(_smoke(tmp_path, shared_data, "file.txt"))
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match=r"--weights .*notes.pt.*not a PyTorch checkpoint"):
        main(_smoke(tmp_path, shared_data, "o1", "--weights", str(tmp_path / "notes.pt")))
    torch.save({"net": ARCHS["resnet18_tv"](2, 32).state_dict()}, tmp_path / "tv.pth")
    with pytest.raises(SystemExit, match=r"--weights .*tv.pth.*does not fit PaperResNet"):
        main(_smoke(tmp_path, shared_data, "o2", "--weights", str(tmp_path / "tv.pth")))
    # A checkpoint of this recipe names its classes: other classes (of the same number) would score nonsense.
    torch.save({"model": ARCHS["resnet18_paper"](2, 32).state_dict(), "classes": ["cat", "dog"]},
               tmp_path / "last.pt")
    with pytest.raises(SystemExit, match=r"--weights .*last.pt was trained on classes \['cat', 'dog'\].*\['a', 'b'\]"):
        main(_smoke(tmp_path, shared_data, "o3", "--weights", str(tmp_path / "last.pt")))
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_weights_evaluates_the_authors_net_checkpoint(tmp_path, shared_data):
    torch.manual_seed(1)
    model = ARCHS["resnet18_paper"](2, 32)
    # The authors' layout: nn.DataParallel keys under 'net', with their 'acc' and 'epoch'.
    torch.save({"net": {f"module.{k}": v for k, v in model.state_dict().items()}, "acc": 61.0, "epoch": 7},
               tmp_path / "ckpt.pth")
    result = main(_smoke(tmp_path, shared_data, "eval", "--weights", str(tmp_path / "ckpt.pth")))
    rows = {r["k"]: r for r in result["weights_eval"]}
    assert sorted(rows, key=str) == [0.1, 0.2, 0.5, "dense"]
    # The dense row is the checkpoint's own accuracy on val (computed here by hand on the same 4 images).
    images = FileListDataset(load_splits(tmp_path / "d").val, transforms_for(32, 37)[1])
    model.eval()
    with torch.no_grad():
        correct = sum(int(model(x[None]).argmax(1).item() == y) for x, y in images)
    assert rows["dense"]["val_acc"] == pytest.approx(100.0 * correct / len(images))
    assert (tmp_path / "eval" / "weights_eval.csv").is_file() and (tmp_path / "eval" / "sweep.pdf").is_file()


def test_smoke_run_gives_all_six_rows_in_both_protocols_and_never_mixes_runs(shared_data, tmp_path):
    out = tmp_path / "run"
    argv = ["--smoke", "--data", str(shared_data / "few-shot"), "--styles", str(shared_data / "style-targets"),
            "--out", str(out), "--max-per-class", "1", "--device", "cpu"]
    result = main(argv)

    for protocol in ("paper", "final"):
        rows = {r["row"]: r for r in result["table"] if r["protocol"] == protocol}
        assert sorted(rows) == ["(1)", "(2)", "(3)", "(4)", "(5)", "(6)"]
        assert all(0 <= r["val_mean"] <= 100 and r["seeds"] == 1 for r in rows.values())
        sweep = {r["k"]: r for r in result["sweep"]}
        assert sorted(sweep) == [0.1, 0.2, 0.5]  # the smoke sweep plus the training K
        assert rows["(2)"]["val_mean"] == sweep[0.2]["val_acc"]
        assert rows["(3)"]["val_mean"] == max(r["val_acc"] for r in sweep.values())
    table = (out / "table.md").read_text()
    assert "Paper protocol: best val and best stylized val" in table and "Final epoch" in table
    assert "meaningless" in table
    for name in ("curves.png", "curves.pdf", "sweep.png", "sweep.pdf", "table.csv", "table.json", "sweep.csv",
                 "history.csv", "config.json", "run.json", "stylized-val/MEANINGLESS.txt", "runs/topk/seed0/last.pt"):
        assert (out / name).is_file(), name
    assert [r["run"] for r in result["history"]] == ["dense", "topk", "l1-1", "mean_replace"]
    saved = torch.load(out / "runs/topk/seed0/last.pt", weights_only=True)
    assert saved["model_config"] == {"arch": "resnet18_paper", "num_classes": 4, "image_size": 32,
                                     "topk": {"positions": ["layer2"], "k": 0.2, "mode": "topk",
                                              "kind": "spatial", "ties": "first"}}

    # Rerunning into the finished folder without --resume/--overwrite is refused and changes nothing.
    before = {p: p.read_bytes() for p in (out / "history.csv", out / "table.md", out / "runs/topk/seed0/last.pt")}
    with pytest.raises(SystemExit, match=r"already holds an earlier run.*--resume.*--overwrite"):
        main(argv)
    # --resume with a K the run was not trained with: the saved config wins, the conflict names both values.
    with pytest.raises(SystemExit, match=r"k: the run has None, this command gives 0.5"):
        main([*argv, "--resume", "--k", "0.5"])
    assert all(p.read_bytes() == data for p, data in before.items())


def _history(out):
    return (out / "history.csv").read_text()


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(shared_data, tmp_path):
    argv = ["--variant", "topk", "--epochs", "2", "--batch-size", "2"]
    whole = main(_smoke(tmp_path, shared_data, "whole", *argv))
    assert whole["finished"] and len(whole["history"]) == 2

    part = main(_smoke(tmp_path, shared_data, "part", *argv, "--stop-after-epochs", "1"))
    assert not part["finished"] and not (tmp_path / "part" / "table.md").exists()
    resumed = main(_smoke(tmp_path, shared_data, "part", *argv, "--resume"))
    assert resumed["finished"]
    assert _history(tmp_path / "part") == _history(tmp_path / "whole")  # every column of every epoch, exactly
    assert (tmp_path / "part" / "table.csv").read_text() == (tmp_path / "whole" / "table.csv").read_text()

    # A checkpoint cut short (a kill mid-save with a plain torch.save) is reported by name, not as a traceback.
    last = tmp_path / "part" / "runs" / "topk" / "seed0" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(SystemExit, match=r"last.pt.*truncated"):
        main(_smoke(tmp_path, shared_data, "part", *argv, "--resume"))


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_in_a_loader_exits_naming_the_file(tmp_path, workers):
    data = _pair(tmp_path / "d")
    good = (data / "train" / "a" / "a_0.png").read_bytes()
    (data / "train" / "a" / "a_1.png").write_bytes(good[: len(good) // 2])
    loader = DataLoader(FileListDataset(load_splits(data).train, transforms_for(32, 37)[1]), batch_size=4,
                        num_workers=workers)
    with pytest.raises(SystemExit, match=r"^cannot read image .*a_1.png: .*--skip-bad-images\)$"):
        with bad_images_exit():
            list(loader)


def test_skip_bad_images_leaves_them_out_and_lists_them(tmp_path, shared_data):
    options = ["--variant", "dense", "--sweep-k", "0.5"]
    argv = _smoke(tmp_path, shared_data, "o1", *options)
    bad = tmp_path / "d" / "train" / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(SystemExit, match=r"cannot read image .*broken.png"):
        main(argv)
    result = main(_smoke(tmp_path, shared_data, "o2", *options, "--skip-bad-images"))
    assert result["finished"] and len(result["history"]) == 1
    assert (tmp_path / "o2" / "skipped_images.txt").read_text().strip() == str(bad)
