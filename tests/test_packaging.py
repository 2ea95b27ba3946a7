"""The installed package: only namespaced import names, one version, recipes runnable from a checkout."""
import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import topk_plugin

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    pytest.importorskip("setuptools", minversion="77")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True)
    (path,) = out.glob("topk_plugin-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_installs_only_the_topk_plugin_namespace(wheel):
    top_level = {name.split("/")[0] for name in wheel.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"topk_plugin"}
    names = set(wheel.namelist())
    for module in ("topk_plugin/integrations/shape_bias.py", "topk_plugin/recipes/_common.py",
                   "topk_plugin/recipes/shape_bias.py"):
        assert module in names


def test_wheel_metadata_version_is_the_package_version(wheel):
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    text = wheel.read(metadata).decode()
    assert f"\nVersion: {topk_plugin.__version__}\n" in text
    requires = [line for line in text.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert all(("torch" in line) for line in requires), requires  # pandas, tqdm... only behind extras


def test_installed_version_matches():
    assert importlib.metadata.version("topk-plugin") == topk_plugin.__version__


RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.py") if "__main__" in p.read_text())


@pytest.mark.parametrize("script", RECIPES, ids=lambda p: p.name)
def test_every_recipe_runs_from_the_checkout_with_the_standard_options(script):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    if "{" in done.stdout.split("\n")[0]:  # sub-commands carry the options
        command = done.stdout.split("{")[1].split(",")[0].split("}")[0]
        done = subprocess.run([sys.executable, str(script), command, "--help"], capture_output=True, text=True)
    for option in ("--data", "--out", "--device", "--seed", "--smoke", "--overwrite"):
        assert option in done.stdout, f"{script.name} --help lacks {option}"
    assert "default" in done.stdout


def test_no_generic_top_level_names_are_importable():
    for name in ("integrations", "recipes"):
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd="/")
        assert probe.returncode != 0, f"'import {name}' works: a generic name leaked into site-packages"


def test_scripts_never_modify_an_environment_they_did_not_create(tmp_path):
    foreign = tmp_path / "someone-elses-env"
    (foreign / "bin").mkdir(parents=True)
    calls = tmp_path / "calls.log"
    (foreign / "bin" / "python").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (foreign / "bin" / "python").chmod(0o755)
    (foreign / "bin" / "activate").write_text("ACTIVATED=yes\n")
    done = subprocess.run(["bash", "-c", f". {ROOT / 'scripts' / 'env.sh'} && echo $ACTIVATED"],
                          env={"TOPK_VENV": str(foreign), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "yes"
    assert "never modified" in done.stderr
    assert not calls.exists(), f"env.sh ran the foreign python: {calls.read_text()}"
    assert sorted(p.name for p in foreign.iterdir()) == ["bin"]
