"""topk_plugin.recipes.fastgan: train / resume / sample / eval / sweep at smoke size, through the real torch-fidelity path."""
import json
import math

import pandas as pd
import pytest
import torch

from topk_plugin.integrations.fidelity import write_random_inception_weights
from topk_plugin.recipes import fastgan
from topk_plugin import keep_count


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
def topk_run(tmp_path_factory, inception, shared_data):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("fastgan") / "topk"
    data = shared_data / "few-shot" / "jeep"
    summary = fastgan.main(["train", "--smoke", "--data", str(data), "--out", str(out), "--topk", "paper",
                            "--inception-weights", str(inception)])
    return out, data, summary


def test_smoke_train_writes_every_output(topk_run):
    out, _, summary = topk_run
    assert summary["iterations"] == 50 and summary["topk"] == "Top-K feat_32 k=0.05 (topk)"
    assert summary["reconstruction_loss"].startswith("L1 (fallback")
    assert len(summary["history"]) == 1 and math.isfinite(summary["best"]["fid"])
    for name in ("fid_kid.png", "topk_maps.png", "metrics.csv", "best.pt", "last.pt", "grids/iter_000050.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text())["best"] == summary["best"]
    assert pd.read_csv(out / "metrics.csv")["fid"].iloc[0] == pytest.approx(summary["best"]["fid"])


def test_topk_maps_are_the_layer_masks_over_checkpoints(topk_run):
    out = topk_run[0]
    maps = sorted((out / "topk_maps").glob("iter_*.pt"))
    assert [p.stem for p in maps] == ["iter_000000", "iter_000050"]
    entry = torch.load(maps[-1])
    masks = entry["masks"]
    assert masks.dtype == torch.bool and masks.shape[-2:] == (32, 32)
    assert (masks.flatten(2).sum(-1) == keep_count(0.05, 1024)).all()
    assert entry["images"].dtype == torch.uint8 and entry["images"].shape[-1] == 64


def test_resume_continues_the_history(tmp_path, topk_run, inception):
    out, data, _ = topk_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "last.pt").write_bytes((out / "last.pt").read_bytes())
    summary = fastgan.main(["train", "--smoke", "--data", str(data), "--out", str(resumed), "--topk", "paper",
                            "--inception-weights", str(inception), "--iters", "55", "--eval-every", "5",
                            "--resume"])
    assert summary["iterations"] == 55
    assert [h["iteration"] for h in summary["history"]] == [50, 55]


def test_sample_and_eval_from_the_best_checkpoint(tmp_path, topk_run, inception):
    out, data, _ = topk_run
    fastgan.main(["sample", "--smoke", "--out", str(out), "--n", "5"])
    samples = sorted((out / "samples").glob("*.png"))
    assert len(samples) == 5 and (out / "samples.png").is_file()
    result = fastgan.main(["eval", "--smoke", "--data", str(data), "--out", str(tmp_path / "eval"),
                           "--samples", str(out / "samples"), "--inception-weights", str(inception)])
    assert result["num_generated"] == 5 and result["num_real"] == 8 and math.isfinite(result["fid"])
    from_ckpt = fastgan.main(["eval", "--smoke", "--data", str(data), "--out", str(tmp_path / "eval"),
                              "--ckpt", str(out / "best.pt"), "--inception-weights", str(inception)])
    assert from_ckpt["num_generated"] == 8 and math.isfinite(from_ckpt["fid"])


def test_missing_inception_weights_stop_before_training(tmp_path, monkeypatch, shared_data):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="--inception-weights FILE.*--no-metrics"):
        fastgan.main(["train", "--smoke", "--data", str(shared_data / "few-shot" / "table"), "--out", str(out)])
    assert not (out / "grids").exists() and not (out / "last.pt").exists()


def test_bad_topk_spec_is_named(tmp_path, shared_data):
    with pytest.raises(SystemExit, match="'feat_33'.*closest names"):
        fastgan.main(["train", "--smoke", "--no-metrics", "--topk", "feat_33", "--data",
                      str(shared_data / "few-shot" / "fish"), "--out", str(tmp_path)])


def test_sweep_table_and_json_spec(tmp_path, inception, shared_data):
    out = tmp_path / "sweep"
    spec = json.dumps({"positions": ["feat_32"], "k": 0.1, "mode": "topk"})
    table = fastgan.main(["sweep", "--smoke", "--data", str(shared_data / "few-shot" / "railway"), "--out", str(out),
                          "--iters", "3", "--eval-every", "3", "--ks", "0.05,0.5", "--topk", spec,
                          "--inception-weights", str(inception)])
    assert list(table["method"]) == ["dense", "topk_0.05", "topk_0.5"]
    assert table["fid"].notna().all() and (table["it_per_s"] > 0).all()
    ran = json.loads((out / "topk_0.5" / "seed0" / "results.json").read_text())
    assert ran["topk"] == "Top-K feat_32 k=0.5 (topk)" and ran["iterations"] == 3
    text = (out / "sweep.md").read_text()
    assert "| FastGAN |" in text and "| FastGAN + Top-K 5% |" in text and "| FastGAN + Top-K 50% |" in text
    assert (out / "sweep.png").is_file() and (out / "sweep.csv").is_file()
    again = fastgan.main(["sweep", "--smoke", "--data", str(shared_data / "few-shot" / "railway"), "--out", str(out),
                          "--iters", "3", "--ks", "0.05,0.5", "--topk", spec, "--no-metrics"])
    assert again["fid"].tolist() == table["fid"].tolist()  # finished runs are reused, not retrained
