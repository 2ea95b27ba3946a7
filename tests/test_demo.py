import re

import pytest
from pathlib import Path

from topk_plugin.demo import main, preset_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_demo_reports_measured_sparsity_of_the_paper_preset(capsys):
    report = main(["--model", "alexnet", "--size", "128"])
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "architecture 'alexnet'" in out
    assert [row["position"] for row in report] == ["features.2", "features.5", "features.7", "features.9", "features.12"]
    for row in report:
        h, w = row["shape"][2:]
        assert row["kept"] == pytest.approx(max(1, int(0.1 * h * w)) / (h * w))
        assert row["nonzero_out"] <= row["kept"]


def test_demo_takes_timm_names_and_overrides_k():
    report = main(["--model", "resnet18", "--size", "64", "--k", "0.5"])
    assert [(row["position"], row["k"]) for row in report] == [("layer2", 0.5)]


def test_readme_preset_table_is_the_registry():
    import topk_plugin.recipes.fastgan_models  # noqa: F401  registers the FastGAN generator's preset

    table = preset_table("paper")
    assert table in README.read_text(), "README's preset table is stale: paste `python -m topk_plugin.demo --presets`"
    assert len(re.findall(r"^\| \w", table, flags=re.M)) >= 7
