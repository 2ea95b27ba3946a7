import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from topk_plugin.demo import preset_table, run

README = Path(__file__).resolve().parents[1] / "README.md"


def test_demo_reports_measured_sparsity_of_the_paper_preset(capsys):
    report = run(["--model", "alexnet", "--size", "128"])
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "architecture 'alexnet'" in out
    assert [row["position"] for row in report] == ["features.2", "features.5", "features.7", "features.9", "features.12"]
    for row in report:
        h, w = row["shape"][2:]
        assert row["kept"] == pytest.approx(max(1, int(0.1 * h * w)) / (h * w))
        assert row["nonzero_out"] <= row["kept"]


def test_demo_takes_timm_names_and_overrides_k(capsys):
    report = run(["--model", "timm/resnet18", "--size", "64", "--k", "0.5"])
    assert "(timm.models.resnet.ResNet)" in capsys.readouterr().out  # timm's, not torchvision's resnet18
    assert [(row["position"], row["k"]) for row in report] == [("layer2", 0.5)]


def test_console_script_exits_0_and_prints_the_report_once():
    script = shutil.which("topk-plugin-demo") or str(Path(sys.executable).parent / "topk-plugin-demo")
    if not Path(script).is_file():
        pytest.fail("the topk-plugin-demo console script is not installed; pip install -e . first")
    done = subprocess.run([script, "--model", "alexnet", "--spec", "stage-ends", "--size", "96"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("position") == 0 and done.stdout.count("nonzero_out") == 1
    assert [line.split()[0] for line in done.stdout.splitlines() if line.startswith("features.")] == [
        "features.1", "features.4", "features.11", "features.12"]


def test_readme_preset_table_is_the_registry():
    table = preset_table("paper")
    assert table in README.read_text(), "README's preset table is stale: paste `python -m topk_plugin.demo --presets`"
    assert len(re.findall(r"^\| \w", table, flags=re.M)) >= 8
    assert "| fastgan | `feat_32` |" in table  # in the core registry, without importing the recipe
