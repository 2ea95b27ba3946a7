"""topk_plugin.recipes.fastgan: train / resume / rollback / sample / eval / sweep at smoke size, real torch-fidelity."""
import json
import math
import shutil

import pandas as pd
import pytest
import torch

from topk_plugin import keep_count, topk_layers
from topk_plugin.integrations.fidelity import write_random_inception_weights
from topk_plugin.recipes import fastgan
from topk_plugin.recipes.fastgan_models import GeneratorConfig


@pytest.fixture(autouse=True)
def _one_thread():
    # smoke models are tiny: a second thread only adds synchronisation (and stalls on a busy machine)
    torch.set_num_threads(1)


def _offline(*args, **kwargs):
    raise OSError("offline")


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random.pth")


@pytest.fixture(scope="module")
def jeep(shared_data):
    return shared_data / "few-shot" / "jeep"


@pytest.fixture(scope="module")
def few(tmp_path_factory, jeep):
    """Ten of the jeep images: runs that test the recipe's logic, not the data, load them in a tenth of the time."""
    folder = tmp_path_factory.mktemp("few")
    for path in sorted(jeep.iterdir())[:10]:
        shutil.copyfile(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def topk_run(tmp_path_factory, inception, jeep):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("fastgan") / "topk"
    summary = fastgan.main(["train", "--smoke", "--data", str(jeep), "--out", str(out), "--topk", "paper",
                            "--eval-every", "6", "--inception-weights", str(inception)])
    return out, summary


def _train(out, data, *extra):
    return fastgan.main(["train", "--smoke", "--no-metrics", "--data", str(data), "--out", str(out), *extra])


def test_smoke_train_writes_every_output_with_the_paper_defaults(topk_run):
    out, summary = topk_run
    assert summary["iterations"] == 6 and summary["topk"] == "Top-K feat_32 k=0.05 (topk)"
    assert summary["reconstruction_loss"].startswith("L1 (fallback")
    assert summary["metrics"] == "FID/KID (torch-fidelity, paper protocol)"
    (row,) = summary["history"]
    assert len(row["fid_repeats"]) == 3 and row["fid"] == min(row["fid_repeats"])  # the fork: best of 3 draws
    assert math.isfinite(summary["best"]["fid"])
    config = json.loads((out / "config.json").read_text())
    assert (config["noise"], config["se_gate"], config["output"], config["policy"], config["resize"]) == (
        False, "none", "fastgan", "color,translation", "stretch")
    for name in ("fid_kid.png", "fid_kid.pdf", "topk_maps.png", "topk_maps.pdf", "metrics.csv", "best.pt", "last.pt",
                 "grids/iter_000006.png", "run.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text())["best"] == summary["best"]
    assert pd.read_csv(out / "metrics.csv")["fid"].iloc[0] == pytest.approx(summary["best"]["fid"])
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["generator"] == {"size": 64, "ngf": 8, "nz": 32, "noise": False, "se_gate": "none",
                                 "output": "fastgan"}
    assert ckpt["topk"] == {"topk": "paper", "k": None}


def test_topk_maps_are_the_layer_masks_over_checkpoints(topk_run):
    out = topk_run[0]
    maps = sorted((out / "topk_maps").glob("iter_*.pt"))
    assert [p.stem for p in maps] == ["iter_000000", "iter_000006"]
    entry = torch.load(maps[-1])
    masks = entry["masks"]
    assert masks.dtype == torch.bool and masks.shape[-2:] == (32, 32)
    assert (masks.flatten(2).sum(-1) == keep_count(0.05, 1024)).all()
    assert entry["images"].dtype == torch.uint8 and entry["images"].shape[-1] == 64
    assert entry["position"] == "feat_32" and entry["k"] == 0.05  # the core preset's


@pytest.mark.parametrize("topk, expected", [
    ("paper", {"feat_32": 0.05}),  # the core FastGAN preset
    ("preset:paper", {"feat_32": 0.05}),
    ("feat_32,feat_64", {"feat_32": 0.1, "feat_64": 0.1}),
    ('[{"positions": ["feat_32"], "k": 0.2}, {"positions": ["feat_64"], "k": 0.3}]', {"feat_32": 0.2, "feat_64": 0.3}),
])
def test_topk_option_reads_the_core_spec_language(topk, expected):
    generator = fastgan.build_generator(GeneratorConfig(64, 4, 8), topk, None)
    assert {position: layer.k for position, layer in topk_layers(generator).items()} == expected


@pytest.mark.parametrize("topk, message", [
    ("feat_32,,feat_64", "empty position between commas"),
    ('{"positions": ["feat_32"], "kk": 0.1}', r"unknown TopKSpec field\(s\) \['kk'\]"),
    ("{feat_32", "not valid JSON"),
    ("preset:nope", "unknown preset 'nope'"),
])
def test_a_bad_topk_is_named(topk, message):
    with pytest.raises(SystemExit, match=r"--topk .*" + message):
        fastgan.build_generator(GeneratorConfig(64, 4, 8), topk, None)


def test_a_finished_run_is_never_mixed_with_a_new_one(tmp_path, topk_run, few):
    out = tmp_path / "run"
    shutil.copytree(topk_run[0], out)
    with pytest.raises(SystemExit, match="already holds an earlier run.*--resume.*--overwrite"):
        _train(out, few, "--iters", "2")
    _train(out, few, "--iters", "3", "--eval-every", "3", "--overwrite")
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["iter_000003.png"]  # the old grids are gone
    assert sorted(p.name for p in (out / "topk_maps").iterdir()) == ["iter_000000.pt", "iter_000003.pt"]
    assert json.loads((out / "config.json").read_text())["topk"] == "none" and not (out / "best.pt").exists()
    with pytest.raises(SystemExit, match="is a file"):
        _train(out / "metrics.csv", few)


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, few, monkeypatch):
    args = ("--topk", "paper", "--iters", "3", "--eval-every", "2")
    whole = _train(tmp_path / "whole", few, *args)
    real_update = fastgan.update_ema
    calls = []

    def killed_in_iteration_three(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # the last checkpoint is from iteration 2
            raise KeyboardInterrupt
        real_update(*a, **k)

    monkeypatch.setattr(fastgan, "update_ema", killed_in_iteration_three)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "cut", few, *args)
    monkeypatch.setattr(fastgan, "update_ema", real_update)
    resumed = _train(tmp_path / "cut", few, *args, "--resume")
    assert resumed["iterations"] == whole["iterations"] == 3 and resumed["iterations_run"] == 3
    assert [h["iteration"] for h in resumed["history"]] == [2, 3]
    ours, theirs = (torch.load(p / "last.pt", weights_only=True) for p in (tmp_path / "cut", tmp_path / "whole"))
    for name in ("g", "g_ema", "d", "opt_g", "sampler"):
        assert _same(ours[name], theirs[name]), name
    maps = [torch.load(p / "topk_maps" / "iter_000003.pt") for p in (tmp_path / "cut", tmp_path / "whole")]
    assert torch.equal(maps[0]["images"], maps[1]["images"])


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_resume_refuses_a_conflicting_option_and_a_truncated_checkpoint(tmp_path, topk_run, jeep):
    out = tmp_path / "run"
    shutil.copytree(topk_run[0], out)
    with pytest.raises(SystemExit, match=r"k: the run has None, this command gives 0\.5"):
        _train(out, jeep, "--topk", "paper", "--k", "0.5", "--resume")
    with pytest.raises(SystemExit, match="se_gate: the run has 'none', this command gives 'sigmoid'"):
        _train(out, jeep, "--se-gate", "sigmoid", "--resume")
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match=r"last\.pt.*truncated"):
        _train(out, jeep, "--iters", "7", "--resume")


def test_rollback_returns_to_the_best_checkpoint(tmp_path, few, monkeypatch, inception):
    fids = iter([5.0, 6.0, 7.0, 4.0, 8.0])

    def scripted(*args, **kwargs):
        fid = next(fids)
        return {"fid": fid, "kid": fid / 100, "kid_std": 0.0, "fid_repeats": [fid]}

    monkeypatch.setattr(fastgan, "fid_kid", scripted)
    summary = fastgan.main(["train", "--smoke", "--data", str(few), "--out", str(tmp_path / "run"),
                            "--inception-weights", str(inception), "--iters", "3", "--eval-every", "1",
                            "--rollback-patience", "2", "--max-rollbacks", "1"])
    history = summary["history"]
    # evaluations at 1 (best), 2, 3 (2 without a better FID: back to 1), then 2 (new best), 3; one rollback at most
    assert [h["iteration"] for h in history] == [1, 2, 3, 2, 3]
    assert history[2]["rollback_to"] == 1 and summary["rollbacks"] == 1
    assert summary["best"] == {"iteration": 2, "fid": 4.0, "kid": 0.04, "kid_std": 0.0}
    assert summary["iterations_run"] == 5


def test_bad_inputs_stop_before_any_work(tmp_path, jeep, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="--inception-weights FILE.*--no-metrics"):
        fastgan.main(["train", "--smoke", "--data", str(jeep), "--out", str(out)])
    with pytest.raises(SystemExit, match="'feat_33'.*closest names"):
        _train(out, jeep, "--topk", "feat_33")
    with pytest.raises(SystemExit, match="--k '1.5'"):
        _train(out, jeep, "--k", "1.5")
    with pytest.raises(SystemExit, match="--device 'cuda:7'"):
        _train(out, jeep, "--device", "cuda:7")
    assert not out.exists()
    bad = tmp_path / "images"
    bad.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (bad / name).write_bytes((jeep / sorted(p.name for p in jeep.iterdir())[0]).read_bytes())
    (bad / "b.png").write_bytes((bad / "b.png").read_bytes()[:300])
    with pytest.raises(SystemExit, match=r"cannot read image .*b\.png"):
        _train(out, bad)
    assert not out.exists()
    summary = _train(out, bad, "--skip-bad-images", "--iters", "1")
    assert summary["images"] == 2


def test_sample_and_eval_from_the_run(tmp_path, topk_run, inception, jeep):
    out = topk_run[0]
    fastgan.main(["sample", "--smoke", "--ckpt", str(out), "--out", str(tmp_path / "samples"), "--n", "5"])
    samples = sorted((tmp_path / "samples" / "samples").glob("*.png"))
    assert len(samples) == 5 and (tmp_path / "samples" / "samples.png").is_file()
    with pytest.raises(SystemExit, match="--k: the checkpoint has None, this command gives 0.2"):
        fastgan.main(["sample", "--smoke", "--ckpt", str(out), "--out", str(tmp_path / "other"), "--k", "0.2"])
    result = fastgan.main(["eval", "--smoke", "--data", str(jeep), "--out", str(tmp_path / "eval"),
                           "--samples", str(tmp_path / "samples" / "samples"), "--inception-weights", str(inception)])
    assert result["num_generated"] == 5 and result["num_real"] == 4 and result["protocol"] == "paper"  # --n-real 4
    assert math.isfinite(result["fid"]) and len(result["fid_repeats"]) == 1  # a fixed set is scored once
    from_ckpt = fastgan.main(["eval", "--smoke", "--data", str(jeep), "--out", str(tmp_path / "eval2"),
                              "--ckpt", str(out / "best.pt"), "--inception-weights", str(inception),
                              "--fid-protocol", "standard"])
    assert from_ckpt["num_generated"] == 4 and from_ckpt["protocol"] == "standard" and math.isfinite(from_ckpt["fid"])


def test_sweep_runs_a_count_and_a_fraction_apart_and_refuses_a_repeated_seed(tmp_path, few, monkeypatch):
    """K = 1 (a count) and K = 1.0 (all positions) are two runs in two folders; --seeds 0,0 would count one
    run twice. Training is stubbed: each run reports its K as its FID."""
    def fake_train(config, out, *args, **kwargs):
        out.mkdir(parents=True, exist_ok=True)
        summary = {"best": {"fid": 100.0 * (config.k or 0), "kid": None}, "it_per_s": 1.0, "iterations": 1}
        (out / "results.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(fastgan, "train_run", fake_train)
    spec = json.dumps({"positions": ["feat_32"], "k": 0.1, "mode": "topk"})
    argv = ["sweep", "--smoke", "--no-metrics", "--data", str(few), "--topk", spec, "--ks", "1,1.0"]
    rows = fastgan.main([*argv, "--out", str(tmp_path / "a")])
    assert [(r["method"], r["k"], r["fid"]) for r in rows] == [("dense", None, 0.0), ("topk_1", 1, 100.0),
                                                              ("topk_1.0", 1.0, 100.0)]
    assert type(rows[1]["k"]) is int and type(rows[2]["k"]) is float
    with pytest.raises(SystemExit, match="--seeds: 0 is given more than once"):
        fastgan.main([*argv, "--out", str(tmp_path / "b"), "--seeds", "0,0"])
    assert not (tmp_path / "b").exists()


def test_sweep_table_and_resume_reuses_finished_runs(tmp_path, few):
    out = tmp_path / "sweep"
    spec = json.dumps({"positions": ["feat_32"], "k": 0.1, "mode": "topk"})
    argv = ["sweep", "--smoke", "--no-metrics", "--data", str(few), "--out", str(out), "--iters", "2",
            "--eval-every", "2", "--ks", "0.5", "--topk", spec]
    rows = fastgan.main(argv)
    assert [r["method"] for r in rows] == ["dense", "topk_0.5"]
    assert all(r["fid"] is None and r["it_per_s"] > 0 for r in rows)
    ran = json.loads((out / "topk_0.5" / "seed0" / "results.json").read_text())
    assert ran["topk"] == "Top-K feat_32 k=0.5 (topk)" and ran["iterations"] == 2
    text = (out / "sweep.md").read_text()
    assert "| FastGAN | not measured |" in text and "| FastGAN + Top-K 50% |" in text
    stamp = (out / "dense" / "seed0" / "results.json").stat().st_mtime_ns
    again = fastgan.main(argv + ["--resume"])
    assert again == rows and (out / "dense" / "seed0" / "results.json").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="ks"):
        fastgan.main(argv[:-4] + ["--ks", "0.2", "--topk", spec, "--resume"])
