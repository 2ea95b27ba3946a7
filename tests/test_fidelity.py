"""topk_plugin.integrations.fidelity: the real torch-fidelity pipeline, run offline on a random-weights Inception file."""
import math

import pytest
import torch
import torch_fidelity
from PIL import Image
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from topk_plugin.integrations import fidelity
from topk_plugin.integrations.fidelity import InceptionWeightsUnavailable, fid_kid, resolve_inception_weights


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return fidelity.write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random.pth")


def _folder(path, images):
    path.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path / f"{i}.png")
    return path


def _images(n, seed, size=32):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


class TinyGenerator(nn.Module):
    def __init__(self, nz=4, size=16):
        super().__init__()
        self.size = size
        self.fc = nn.Linear(nz, 3 * size * size)

    def forward(self, z):
        return torch.tanh(self.fc(z)).view(-1, 3, self.size, self.size), None


def test_random_weights_file_has_torch_fidelity_keys_and_loads(inception_weights):
    state = torch.load(inception_weights)
    # torch-fidelity's own constructor loads it strictly: the keys and shapes are right
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["64"],
                                      feature_extractor_weights_path=str(inception_weights))
    assert set(state) == set(net.state_dict())
    assert all(state[k].shape == v.shape for k, v in net.state_dict().items())
    with torch.no_grad():
        features = net(_images(2, 0))[0]
    assert features.shape == (2, 64) and features.std() > 0  # the He init keeps activations alive


def test_identical_sets_score_zero_and_different_sets_do_not(tmp_path, inception_weights):
    real = _images(6, 1)
    folder = _folder(tmp_path / "real", real)
    same = fid_kid(folder, real, weights_path=inception_weights, features="64")
    other = fid_kid(_images(6, 2) // 4, real, weights_path=inception_weights, features="64")
    assert same["num_generated"] == same["num_real"] == 6 and same["features"] == "64"
    assert abs(same["fid"]) < 1e-3
    assert other["fid"] > 1.0 and other["kid"] > same["kid"]


def test_standard_2048_features_from_a_generator(inception_weights):
    # the one test of the full network and the 2048x2048 FID eigenproblem (several seconds whatever the set size)
    generator = TinyGenerator().train()
    result = fid_kid(generator, _images(2, 3), weights_path=inception_weights, nz=4, num_samples=2,
                     kid_subset_size=1000)
    assert result["features"] == "2048" and result["num_generated"] == 2 and result["num_real"] == 2
    assert math.isfinite(result["fid"]) and result["fid"] > 0
    assert math.isfinite(result["kid"]) and math.isfinite(result["kid_std"])
    assert generator.training  # put back in the mode it came in


def test_generated_samples_are_reproducible_for_a_seed(inception_weights):
    generator, real = TinyGenerator(), _images(4, 4)
    runs = [fid_kid(generator, real, weights_path=inception_weights, nz=4, num_samples=4, features="64", seed=s)
            for s in (7, 7, 8)]
    assert runs[0]["fid"] == pytest.approx(runs[1]["fid"], rel=1e-6)
    assert runs[0]["fid"] != pytest.approx(runs[2]["fid"], rel=1e-6)


def _torch_fidelity(input1, input2, weights, **options):
    """torch-fidelity's own pipeline (its extractor built anew, nothing kept between calls), at layer 64."""
    metrics = torch_fidelity.calculate_metrics(
        input1=input1, input2=input2, fid=True, kid=True, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(weights), feature_layer_fid="64", feature_layer_kid="64",
        samples_find_deep=True, samples_find_ext=fidelity.IMAGE_EXTENSIONS, batch_size=32, cuda=False,
        save_cpu_ram=True, cache=False, verbose=False, **options)
    return [metrics[k] for k in ("frechet_inception_distance", "kernel_inception_distance_mean",
                                 "kernel_inception_distance_std")]


def _scores(result):
    return [result[k] for k in ("fid", "kid", "kid_std")]


def test_kept_extractor_and_reference_features_give_torch_fidelity_s_scores(tmp_path, inception_weights):
    real, generated, generator = _images(4, 11), _images(3, 12), TinyGenerator()
    folder = _folder(tmp_path / "real", real)
    options = dict(weights_path=inception_weights, features="64", seed=3)
    fidelity.clear_caches()
    first = fid_kid(generated, folder, **options)
    again = fid_kid(generated, folder, **options)  # the reference's features kept from the first call
    assert _scores(first) == _scores(again) == _torch_fidelity(
        fidelity._Uint8Images(generated), str(folder), inception_weights, kid_subset_size=3, rng_seed=3)
    sampled = fid_kid(generator, folder, nz=4, num_samples=3, **options)
    assert _scores(sampled) == _torch_fidelity(
        torch_fidelity.GenerativeModelModuleWrapper(fidelity._ToUint8(generator), 4, "normal", 0), str(folder),
        inception_weights, input1_model_num_samples=3, kid_subset_size=3, rng_seed=3)
    paper = fid_kid(generated, real, protocol="paper", **options)
    # the fork scores image sets with torch-fidelity's default seed (2020) for the KID subsets of every draw
    assert _scores(paper) == _torch_fidelity(
        fidelity._Uint8Images(fidelity.fork_uint8(generated / 255)),
        fidelity._Uint8Images(fidelity.fork_uint8(real / 255)), inception_weights, kid_subset_size=3, rng_seed=2020)
    assert fidelity._extractor.cache_info().misses == 1  # one Inception for every call
    # a changed reference is never scored from features kept for its old content
    Image.fromarray(generated[0].permute(1, 2, 0).numpy()).save(folder / "0.png")
    real[0] = generated[0]
    assert _scores(fid_kid(generated, folder, **options)) != _scores(first)  # a file rewritten
    assert _scores(fid_kid(generated, real, protocol="paper", **options)) != _scores(paper)  # changed in place


@pytest.mark.parametrize("bad, message", [
    (dict(features="1000"), "not an Inception feature layer"),
    (dict(generated=torch.zeros(2, 3, 8, 8)), "must be uint8"),
    (dict(generated=TinyGenerator()), "needs nz"),
    (dict(generated="/no/such/folder"), "neither a generator"),
    (dict(generated=_images(1, 0)), "at least 2 images"),
])
def test_bad_inputs_are_named(bad, message, inception_weights):
    kwargs = dict(generated=_images(3, 0), real=_images(3, 1), weights_path=inception_weights, features="64")
    kwargs.update(bad)
    with pytest.raises(ValueError, match=message):
        fid_kid(kwargs.pop("generated"), kwargs.pop("real"), **kwargs)


def test_weights_resolution_user_file_cache_and_clear_failure(tmp_path, monkeypatch, inception_weights):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert resolve_inception_weights(inception_weights) == inception_weights
    with pytest.raises(InceptionWeightsUnavailable, match="does not exist"):
        resolve_inception_weights(tmp_path / "missing.pth")
    with pytest.raises(InceptionWeightsUnavailable, match="network is unreachable.*--inception-weights"):
        resolve_inception_weights()
    with pytest.raises(InceptionWeightsUnavailable, match="downloading is disabled"):
        resolve_inception_weights(download=False)
    cached = fidelity.cached_inception_path()
    assert cached.parent == tmp_path / "hub" / "checkpoints"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(inception_weights.read_bytes())
    assert resolve_inception_weights() == cached


# ----------------------------------------------------------------------------- the paper's (fork's) protocol

class BatchNormGenerator(nn.Module):
    """Images depend on BatchNorm's statistics, so batch statistics and running statistics differ."""

    def __init__(self, nz=4, size=8):
        super().__init__()
        self.size = size
        self.fc = nn.Linear(nz, 3 * size * size)
        self.norm = nn.BatchNorm1d(3 * size * size)

    def forward(self, z):
        return torch.tanh(self.norm(self.fc(z))).view(-1, 3, self.size, self.size), None


def test_fork_range_maps_unit_images_to_127_255_truncated():
    x = torch.tensor([0.0, 0.25, 0.5, 0.999, 1.0, 1.5]).view(1, 1, 2, 3)
    assert fidelity.fork_uint8(x).flatten().tolist() == [127, 159, 191, 254, 255, 255]


def test_fork_samples_use_batch_statistics_and_leave_the_generator_alone():
    torch.manual_seed(0)
    generator = BatchNormGenerator().eval()
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    images = fidelity.fork_samples(generator, 4, 10, 4, None, torch.device("cpu"), seed=3)
    assert images.shape == (8, 3, 8, 8) and images.dtype == torch.uint8  # 10 // 4 batches of 4
    assert images.min() >= 127
    assert not generator.training and all(torch.equal(v, before[k]) for k, v in generator.state_dict().items())
    rng = torch.Generator().manual_seed(3)
    with torch.no_grad():
        by_batch = [generator.train()(torch.randn(4, 4, generator=rng))[0] for _ in range(2)]
        generator.eval()
    expected = fidelity.fork_uint8((torch.cat(by_batch) + 1) / 2)
    assert torch.equal(images, expected)
    running = fidelity.draw_images(generator, 4, 8, 4, torch.device("cpu"), 3, batch_statistics=False)
    assert not torch.equal(fidelity.fork_uint8((running + 1) / 2), images)


def test_paper_protocol_keeps_the_best_of_three_draws(inception_weights):
    generator, real = BatchNormGenerator(size=16), _images(6, 5, size=16)
    paper = fid_kid(generator, real, weights_path=inception_weights, nz=4, num_samples=6, batch_size=2,
                    features="64", protocol="paper")
    assert paper["protocol"] == "paper" and len(paper["fid_repeats"]) == 3
    assert paper["fid"] == min(paper["fid_repeats"]) and len(set(paper["fid_repeats"])) == 3
    with pytest.raises(ValueError, match="paper protocol .* not a folder"):
        fid_kid("/tmp", real, weights_path=inception_weights, protocol="paper")
    with pytest.raises(ValueError, match="protocol='fork'"):
        fid_kid(real, real, weights_path=inception_weights, protocol="fork")
