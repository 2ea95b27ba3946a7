"""model-vs-human registration: everything that needs no modelvshuman, plus the real thing where it is installed."""
import os
import sys

import pytest
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from topk_plugin.integrations import modelvshuman as mvh
from topk_plugin import TopKSpec, is_sparsified, topk_layers


def _alexnet():
    return torchvision.models.alexnet()


def test_missing_package_raises_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelvshuman", None)  # makes `import modelvshuman` fail
    with pytest.raises(ImportError, match="git clone https://github.com/bethgelab/model-vs-human"):
        mvh.register_model("alexnet_topk10", _alexnet)
    with pytest.raises(ImportError, match="MODELVSHUMANDIR"):
        mvh.register_sweep("alexnet", _alexnet, "paper", ks=[0.1])


@pytest.mark.parametrize("k, name", [(None, "alexnet_dense"), (0.1, "alexnet_topk10"), (0.05, "alexnet_topk5"),
                                     (0.025, "alexnet_topk2p5"), (1.0, "alexnet_topk100"), (7, "alexnet_top7")])
def test_sweep_names(k, name):
    assert mvh.sweep_name("alexnet", k) == name
    assert mvh.check_name(name) == name


@pytest.mark.parametrize("name, message", [("alexnet", "is a torchvision model"),
                                           ("resnet50", "is a torchvision model"),
                                           ("alexnet-topk10", "Python identifier"), ("1net", "Python identifier")])
def test_names_the_benchmark_cannot_resolve_are_refused(name, message):
    with pytest.raises(ValueError, match=message):
        mvh.check_name(name)


@pytest.mark.parametrize("k, mode, name", [(0.1, "non_topk", "alexnet_topk10_non_topk"),
                                           (7, "mean_replace", "alexnet_top7_mean_replace"),
                                           (0.1, "topk", "alexnet_topk10"), (None, "non_topk", "alexnet_dense")])
def test_sweep_names_say_the_mode_when_it_is_not_topk(k, mode, name):
    """A non-Top-K ("Revert") run must not take the Top-K run's name (and its results' file names)."""
    assert mvh.sweep_name("alexnet", k, mode) == name
    assert mvh.check_name(name) == name


@pytest.mark.parametrize("spec, mode, expected", [
    ("paper", None, "topk"), ("paper", "non_topk", "non_topk"),
    (TopKSpec(["features.2"], mode="mean_replace"), None, "mean_replace"),
    ({"positions": ["features.2"], "mode": "non_topk"}, None, "non_topk"),
    ([TopKSpec(["features.2"], mode="non_topk"), TopKSpec(["features.5"], mode="non_topk")], None, "non_topk")])
def test_run_mode_is_the_override_or_the_specs_own(spec, mode, expected):
    assert mvh.run_mode(spec, mode) == expected


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match="k=0"):
        mvh.sweep_name("alexnet", 0)


def test_factories_build_eval_models_with_the_requested_k():
    dense = mvh.sparsified_factory(_alexnet, None)()
    assert not dense.training and not is_sparsified(dense)
    sparse = mvh.sparsified_factory(_alexnet, "paper", k=0.2, mode="non_topk")()
    layers = topk_layers(sparse)
    assert not sparse.training
    assert list(layers) == ["features.2", "features.5", "features.7", "features.9", "features.12"]
    assert {(layer.k, layer.mode) for layer in layers.values()} == {(0.2, "non_topk")}


def test_link_datasets(shared_data, tmp_path):
    target = mvh.link_datasets(shared_data / "texture-shape", tmp_path)
    assert sorted(p.name for p in target.iterdir()) == ["cue-conflict", "edge", "silhouette"]
    assert len(list((target / "cue-conflict" / "airplane").glob("*.png"))) == 80
    with pytest.raises(FileNotFoundError, match="'sketch'"):
        mvh.link_datasets(shared_data / "texture-shape", tmp_path, names=["sketch"])
    with pytest.raises(ValueError, match="not a folder"):
        mvh.link_datasets(shared_data / "texture-shape", tmp_path / "nowhere")


@pytest.mark.skipif(not os.environ.get("MODELVSHUMANDIR"), reason="needs model-vs-human installed (MODELVSHUMANDIR)")
def test_registration_in_the_real_benchmark():
    utils = pytest.importorskip("modelvshuman.utils")
    names = mvh.register_sweep("alexnet", _alexnet, "paper", ks=[0.1, 0.3])
    assert names == ["alexnet_dense", "alexnet_topk10", "alexnet_topk30"]
    from modelvshuman.models import list_models
    assert set(names) <= set(list_models("pytorch"))
    wrapped, framework = utils.load_model("alexnet_topk30")
    assert framework == "pytorch" and wrapped.model_name == "alexnet_topk30"
    assert {layer.k for layer in topk_layers(wrapped.model).values()} == {0.3}
    mvh.register_sweep("alexnet", _alexnet, "paper", ks=[0.1])  # again: no duplicate registry entries
    assert list_models("pytorch").count("alexnet_topk10") == 1


def test_link_datasets_without_home_or_env_refuses_and_writes_nothing(shared_data, tmp_path, monkeypatch):
    monkeypatch.delenv("MODELVSHUMANDIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="MODELVSHUMANDIR is not set"):
        mvh.link_datasets(shared_data / "texture-shape")
    with pytest.raises(ValueError, match="home= is empty"):
        mvh.link_datasets(shared_data / "texture-shape", "")
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=1e-9, max_value=1.0), st.floats(min_value=1e-9, max_value=1.0))
def test_sweep_names_are_injective(a, b):
    assert (mvh.sweep_name("m", a) == mvh.sweep_name("m", b)) == (a == b)
    assert mvh.check_name(mvh.sweep_name("m", a))


def test_close_ks_get_different_names():
    assert mvh.sweep_name("alexnet", 0.1) != mvh.sweep_name("alexnet", 0.1000001)
    assert mvh.sweep_name("alexnet", 1) != mvh.sweep_name("alexnet", 1.0)
