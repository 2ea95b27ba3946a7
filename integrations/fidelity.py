"""FID and KID through torch-fidelity, between a generator (or a folder of samples) and an image folder.

torch-fidelity's Inception network needs its weights: from a file the user gives
(``weights_path``), or from torch-fidelity's normal download into the torch hub cache.
``resolve_inception_weights`` finds them or raises ``InceptionWeightsUnavailable`` with what to do.
``write_random_inception_weights`` makes a randomly initialised weights file with the right keys and
shapes, so that the whole real pipeline can be tested offline (its numbers mean nothing).

Two protocols (``PROTOCOLS``) decide how images reach torch-fidelity's ``inception-v3-compat`` extractor:
``"standard"`` is torch-fidelity as documented; ``"paper"`` is what the paper's authors ran
(``few-shot-img-syn/TopKGen/utlis/eval_agent_module.py`` in Crazy-Jack/nips2023_shape_vs_texture), which
gives different numbers; see ``FidProtocol``.

The scores are torch-fidelity's own functions (feature extraction, FID statistics, KID), called on features
this module keeps: the Inception extractor is built once per process (per weights file, feature layer and
device), and the reference images' features and FID statistics once per reference set (a training run scores
the same images at every evaluation). ``clear_caches`` frees them.
"""
from __future__ import annotations

import functools
import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_EXTRACTOR = "inception-v3-compat"
FEATURE_LAYERS = ("64", "192", "768", "2048")  # "2048" is the standard FID/KID; smaller ones are quick checks
IMAGE_EXTENSIONS = "png,jpg,jpeg,webp,bmp"
REFERENCE_CACHE_SIZE = 4  # reference feature sets kept per process (a training run or a sweep uses one)


@dataclass(frozen=True)
class FidProtocol:
    """How generated and real images are prepared and scored.

    Attributes:
        kid_subset_size: KID subset size (capped at the smaller set).
        repeats: generated sets drawn from a generator; the lowest FID and its KID are reported.
        fork_range: map both sides as the fork does: images in [0, 1] become ``uint8(255 * (x * 0.5 + 0.5))``,
            i.e. [127, 255], truncated; else [0, 255], rounded.
        batch_statistics: sample the generator in training mode (BatchNorm normalises each batch by its
            own statistics, as the fork never calls ``eval()``), in batches of ``batch_size``; generated
            images also go through the fork's nearest-neighbour resize to 512 and back to ``size``.
        kid_seed: the seed of every draw's KID subsets; ``None``: the call's ``seed`` (+ the draw's number), as
            torch-fidelity's ``rng_seed``. The fork scores image sets without one: torch-fidelity's default.
    """

    kid_subset_size: int
    repeats: int
    fork_range: bool
    batch_statistics: bool
    kid_seed: int | None = None


TORCH_FIDELITY_DEFAULT_SEED = 2020
PROTOCOLS = {
    "standard": FidProtocol(kid_subset_size=1000, repeats=1, fork_range=False, batch_statistics=False),
    "paper": FidProtocol(kid_subset_size=100, repeats=3, fork_range=True, batch_statistics=True,
                         kid_seed=TORCH_FIDELITY_DEFAULT_SEED),
}


class InceptionWeightsUnavailable(RuntimeError):
    """Neither a user weights file nor torch-fidelity's download of its Inception weights is available."""


def _fidelity():
    try:
        import torch_fidelity
        from torch_fidelity import feature_extractor_inceptionv3
    except ImportError as err:
        raise ImportError("FID/KID need torch-fidelity: pip install 'topk-plugin[recipes]'") from err
    return torch_fidelity, feature_extractor_inceptionv3


def cached_inception_path() -> Path:
    """Where torch-fidelity's normal download of its Inception weights lands (torch hub cache)."""
    _, inception = _fidelity()
    name = os.path.basename(urlparse(inception.URL_INCEPTION_V3).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def resolve_inception_weights(path: str | Path | None = None, download: bool = True) -> Path:
    """The Inception weights file to use: ``path`` if given, else the cached (or freshly downloaded) one."""
    if path is not None:
        if not Path(path).is_file():
            raise InceptionWeightsUnavailable(f"Inception weights file {str(path)!r} does not exist")
        return Path(path)
    cached = cached_inception_path()
    if cached.is_file():
        return cached
    _, inception = _fidelity()
    if download:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(inception.URL_INCEPTION_V3, str(cached), progress=True)
            return cached
        except Exception as err:  # noqa: BLE001 - no network, proxy, disk: all mean "not available"
            reason = f"downloading it failed ({type(err).__name__}: {err})"
    else:
        reason = "downloading is disabled"
    raise InceptionWeightsUnavailable(
        f"torch-fidelity's Inception weights are not in {cached} and {reason}. Download "
        f"{inception.URL_INCEPTION_V3} on a machine with internet and pass its path "
        "(e.g. --inception-weights FILE), or skip FID/KID (--no-metrics).")


def write_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised state_dict of torch-fidelity's Inception: tests only, FID/KID meaningless."""
    _, inception = _fidelity()

    class _Unloaded(inception.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({}, path)  # the constructor reads the file before (not) loading it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _Unloaded(FEATURE_EXTRACTOR, ["2048"], feature_extractor_weights_path=str(path), verbose=False)
        for m in net.modules():  # He init keeps activations alive through ~100 layers (the default fades them)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


class _ToUint8(nn.Module):
    """Wraps a generator returning images (or a tuple whose first item is the image) in [-1, 1] as uint8."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.generator(z)
        image = out[0] if isinstance(out, (tuple, list)) else out
        return ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class _Uint8Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _image_files(folder: Path) -> list[Path]:
    """The files torch-fidelity reads from ``folder`` (recursively, by ``IMAGE_EXTENSIONS``), sorted."""
    exts = tuple("." + e for e in IMAGE_EXTENSIONS.split(","))
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in exts)


def fork_uint8(images: torch.Tensor) -> torch.Tensor:
    """The fork's mapping of images in [0, 1] to uint8: ``255 * (x.clamp(-1, 1) * 0.5 + 0.5)``, truncated."""
    return (255 * (images.float().clamp(-1, 1) * 0.5 + 0.5)).to(torch.uint8).cpu()


@torch.no_grad()
def draw_images(generator: nn.Module, nz: int, num_samples: int, batch_size: int, device: torch.device,
                seed: int, batch_statistics: bool) -> torch.Tensor:
    """``num_samples`` images (float, on ``device``) from N(0, 1) codes of a seeded stream, ``batch_size`` at a time.

    ``batch_statistics``: run ``generator`` in training mode, so BatchNorm normalises each batch by its own
    statistics as the fork's evaluator does; the buffers that updates (BatchNorm statistics, spectral-norm
    vectors) are put back afterwards. Else ``generator`` runs in eval mode (running statistics). Either way
    it is put back in its mode afterwards.
    """
    was_training = generator.training
    saved = {name: b.clone() for name, b in generator.named_buffers()} if batch_statistics else {}
    generator.to(device).train(batch_statistics)
    rng = torch.Generator(device="cpu").manual_seed(seed)
    batches = []
    try:
        for start in range(0, num_samples, batch_size):
            out = generator(torch.randn(min(batch_size, num_samples - start), nz, generator=rng).to(device))
            batches.append((out[0] if isinstance(out, (tuple, list)) else out).float())
    finally:
        generator.train(was_training)
        for name, buffer in generator.named_buffers():
            if name in saved:
                buffer.copy_(saved[name])
    return torch.cat(batches)


def fork_samples(generator: nn.Module, nz: int, num_samples: int, batch_size: int, size: int | None,
                 device: torch.device, seed: int) -> torch.Tensor:
    """What the fork's evaluator scores: ``num_samples // batch_size`` batches drawn with batch statistics,
    taken to 512 px and back to ``size`` by nearest neighbour, as uint8 in [127, 255] (``fork_uint8``)."""
    images = draw_images(generator, nz, num_samples // batch_size * batch_size, batch_size, device, seed, True)
    size = size or images.shape[-1]
    return fork_uint8(F.interpolate(F.interpolate(images, 512).add(1).mul(0.5), size))


def _as_input(source, nz: int | None, num_samples: int, device: torch.device, protocol: FidProtocol,
              batch_size: int, size: int | None, seed: int):
    """torch-fidelity input for ``source`` and how many images it holds."""
    if isinstance(source, nn.Module):
        if nz is None:
            raise ValueError("a generator input needs nz (its noise dimension)")
        if protocol.batch_statistics:
            return _as_input(fork_samples(source, nz, num_samples, batch_size, size, device, seed), None, 0,
                             device, PROTOCOLS["standard"], batch_size, size, seed)
        torch_fidelity, _ = _fidelity()
        return torch_fidelity.GenerativeModelModuleWrapper(_ToUint8(source).to(device), nz, "normal", 0), num_samples
    if isinstance(source, torch.Tensor):
        if source.dtype != torch.uint8 or source.dim() != 4 or source.shape[1] != 3:
            raise ValueError(f"an image tensor must be uint8 (N, 3, H, W), got {source.dtype} {tuple(source.shape)}")
        images = fork_uint8(source.float() / 255) if protocol.fork_range else source.cpu()
        return _Uint8Images(images), len(source)
    if protocol.fork_range:
        raise ValueError(f"{str(source)!r}: the paper protocol maps image values, so it takes images as a uint8 "
                         "tensor (or a generator), not a folder")
    if not Path(source).is_dir():
        raise ValueError(f"{str(source)!r} is neither a generator (nn.Module), a uint8 image tensor nor a folder")
    return str(source), len(_image_files(Path(source)))


@functools.lru_cache(maxsize=4)
def _extractor(weights: tuple, features: str, cuda: bool) -> nn.Module:
    """torch-fidelity's Inception for one weights file (``_weights_key``) and feature layer, built once:
    building it reads ~100 MB of weights, which every FID call (three per paper-protocol call) used to do."""
    _fidelity()
    from torch_fidelity.utils import create_feature_extractor
    return create_feature_extractor(FEATURE_EXTRACTOR, [features], cuda=cuda,
                                    feature_extractor_weights_path=weights[0], verbose=False)


def _weights_key(path: Path) -> tuple:
    """A weights file by path, size and modification time: a file rewritten in place is read again."""
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _fingerprint(real) -> tuple:
    """What identifies a reference set: a uint8 tensor by shape and a hash of its bytes, a folder by its
    image files' names, sizes and modification times."""
    if isinstance(real, torch.Tensor):
        data = real.detach().cpu().contiguous().numpy().reshape(-1)
        return "tensor", tuple(real.shape), hashlib.blake2b(data, digest_size=20).hexdigest()
    folder = Path(real).resolve()
    return "folder", str(folder), tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                                        for p in _image_files(folder))


_REFERENCES: OrderedDict[tuple, tuple[torch.Tensor, dict]] = OrderedDict()


def clear_caches() -> None:
    """Forget the Inception extractors and reference features this process keeps (frees their memory)."""
    _extractor.cache_clear()
    _REFERENCES.clear()


def _features(source, extractor: nn.Module, layer: str, num_samples: int, seed: int, options: dict) -> torch.Tensor:
    """Inception features of a torch-fidelity input (a folder, a Dataset, a generator wrapper), as
    ``torch_fidelity.calculate_metrics`` extracts them without its file cache."""
    from torch_fidelity.utils import extract_featuresdict_from_input_id
    return extract_featuresdict_from_input_id(1, extractor, input1=source, input1_model_num_samples=num_samples,
                                              rng_seed=seed, **options)[layer]


def _reference(real, source, key: tuple, extractor: nn.Module, layer: str, options: dict) -> tuple[torch.Tensor, dict]:
    """Features and FID statistics of the reference set ``real`` (torch-fidelity input ``source``), computed
    once per ``key`` (the set's fingerprint and everything that changes its features)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics
    key = (_fingerprint(real), *key)
    if key in _REFERENCES:
        _REFERENCES.move_to_end(key)
        return _REFERENCES[key]
    features = _features(source, extractor, layer, 0, 0, options)
    _REFERENCES[key] = features, fid_features_to_statistics(features)
    while len(_REFERENCES) > REFERENCE_CACHE_SIZE:
        _REFERENCES.popitem(last=False)
    return _REFERENCES[key]


def fid_kid(generated, real, *, weights_path: str | Path | None, nz: int | None = None,
            num_samples: int = 3000, size: int | None = None, device: str | torch.device = "cpu",
            batch_size: int = 32, kid_subset_size: int | None = None, features: str = "2048", seed: int = 0,
            protocol: str = "standard", verbose: bool = False) -> dict:
    """FID and KID between ``generated`` and ``real``.

    Args:
        generated: a generator ``G(z)`` (returns images in [-1, 1], or a tuple starting with them; needs
            ``nz``, draws ``num_samples`` N(0, 1) codes), a folder of images, or a uint8 (N, 3, H, W) tensor.
        real: a folder of images (searched recursively) or a uint8 (N, 3, H, W) tensor. Its features are
            kept for the next call with the same images and settings (``clear_caches``).
        weights_path: torch-fidelity Inception weights (``resolve_inception_weights``); ``None``: its
            cached download.
        size: standard protocol: resize (shorter side) and centre-crop every folder image to ``size``
            (``None`` keeps them); paper protocol: the generated images' evaluation size.
        batch_size: images per Inception batch; paper protocol: also per generator call (the fork samples
            in training-batch-size batches, which matters with batch statistics).
        kid_subset_size: KID subset size, capped at the smaller set's size; ``None``: the protocol's.
        features: Inception feature layer; ``"2048"`` (pool3) is the standard one, the others
            (``"64"``, ``"192"``, ``"768"``) skip most of the network and the 2048x2048 eigenproblem.
        protocol: ``"standard"`` or ``"paper"`` (``PROTOCOLS``; the paper's takes tensors, not folders).

    Returns:
        ``{"fid", "kid", "kid_std", "num_generated", "num_real", "features", "protocol", "fid_repeats"}``;
        KID as torch-fidelity reports it (x1, not x10^3); ``fid_repeats`` lists every draw's FID.
    """
    _fidelity()
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    if str(features) not in FEATURE_LAYERS:
        raise ValueError(f"features={features!r} is not an Inception feature layer; "
                         f"choose one of {list(FEATURE_LAYERS)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is not supported; choose one of {list(PROTOCOLS)}")
    rules, layer = PROTOCOLS[protocol], str(features)
    kid_subset_size = rules.kid_subset_size if kid_subset_size is None else kid_subset_size
    device = torch.device(device)
    cuda = device.type == "cuda"
    options = dict(batch_size=batch_size, cuda=cuda, save_cpu_ram=not cuda, samples_find_deep=True,
                   samples_find_ext=IMAGE_EXTENSIONS, samples_resize_and_crop=size or 0, verbose=verbose)
    was_training = generated.training if isinstance(generated, nn.Module) else None
    repeats = rules.repeats if isinstance(generated, nn.Module) else 1  # a fixed set scores the same each time
    real_source, num_real = _as_input(real, None, 0, device, rules, batch_size, size, seed)
    weights = _weights_key(resolve_inception_weights(weights_path, download=False))
    extractor, reference, draws = _extractor(weights, layer, cuda), None, []
    try:  # torch-fidelity puts a generator in eval mode
        for repeat in range(repeats):
            source, num_generated = _as_input(generated, nz, num_samples, device, rules, batch_size, size,
                                              seed + repeat)
            if min(num_generated, num_real) < 2:
                raise ValueError(f"FID/KID need at least 2 images on each side; got {num_generated} generated, "
                                 f"{num_real} real")
            if reference is None:
                key = (weights, layer, cuda, rules.fork_range, size, batch_size)
                reference = _reference(real, real_source, key, extractor, layer, options)
            real_features, real_statistics = reference
            generated_features = _features(source, extractor, layer, num_samples, seed + repeat, options)
            fid = fid_statistics_to_metric(fid_features_to_statistics(generated_features), real_statistics, verbose)
            kid_seed = seed + repeat if rules.kid_seed is None else rules.kid_seed
            kid = kid_features_to_metric(generated_features, real_features, rng_seed=kid_seed, verbose=verbose,
                                         kid_subset_size=min(kid_subset_size, num_real, num_generated))
            draws.append({**fid, **kid})
    finally:
        if was_training is not None:
            generated.train(was_training)
    best = min(draws, key=lambda m: m[KEY_METRIC_FID])
    return {"fid": float(best[KEY_METRIC_FID]), "kid": float(best[KEY_METRIC_KID_MEAN]),
            "kid_std": float(best[KEY_METRIC_KID_STD]), "num_generated": num_generated, "num_real": num_real,
            "features": layer, "protocol": protocol, "fid_repeats": [float(m[KEY_METRIC_FID]) for m in draws]}
