"""Built-in texture–shape evaluator: the numbers model-vs-human gives, without installing it.

Stimuli are read as the benchmark's ``PytorchLoader`` reads them: a ``torchvision`` ``ImageFolder``
(classes and files in sorted order, PIL -> RGB), ``ToTensor`` and the ImageNet mean/std, with no
resizing because the texture–shape datasets are 224 x 224. Images of any other size get the
benchmark's resize branch, ``Resize(256)`` + ``CenterCrop(224)``. Each image is decoded once and kept
as uint8, so a K sweep (and a comparison of several models) normalizes batches on the fly instead of
decoding again. A folder is checked before anything is decoded: category folders must be the 16
categories, and cue-conflict file names must carry both cues with the shape of their folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torchvision import datasets, transforms

from . import optional
from .images import UnreadableImage, read_image
from .imagenet16 import CATEGORIES, IMAGENET_MEAN, IMAGENET_STD, decide
from .shape_bias import COLUMNS, stimulus_cues

if TYPE_CHECKING:
    import pandas as pd

CUE_CONFLICT = "cue-conflict"
DATASETS = (CUE_CONFLICT, "edge", "silhouette")
IMAGE_SIZE = 224
_RESIZE = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(IMAGE_SIZE)])


class UnreadableStimulus(ValueError):
    """A stimulus file that cannot be decoded (truncated, or not an image)."""


@dataclass
class Stimuli:
    """Decoded images of one dataset (uint8, N x 3 x 224 x 224) with their file names and shape categories.

    ``skipped``: files left out because they could not be decoded (``load_stimuli(skip_bad_images=True)``).
    """

    name: str
    images: torch.Tensor
    imagenames: list[str]
    categories: list[str]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.imagenames)


def _progress(iterable, desc: str, enabled: bool):
    return optional("tqdm").tqdm(iterable, desc=desc) if enabled else iterable


def _decode(path: str | Path) -> torch.Tensor:
    """One stimulus as uint8 (3, 224, 224), decoded as the benchmark's PIL loader does."""
    try:
        image = read_image(path)
    except UnreadableImage as err:
        raise UnreadableStimulus(f"stimulus: {err}") from None
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = _RESIZE(image)
    return transforms.functional.pil_to_tensor(image)


def _check_folder(root: Path, name: str, folder: datasets.ImageFolder) -> None:
    """Refuse categories outside the 16 and, for cue-conflict, file names whose cues do not match their folder."""
    for category in folder.classes:
        if category not in CATEGORIES:
            raise ValueError(f"stimulus folder {root}: category folder {category!r} is not one of the 16 "
                             f"categories {list(CATEGORIES)}")
    if name != CUE_CONFLICT:
        return
    for path, label in folder.samples:
        category = folder.classes[label]
        try:
            shape, texture = stimulus_cues(Path(path).name)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        if shape != category or texture not in CATEGORIES:
            raise ValueError(f"{path}: file name has shape {shape!r} and texture {texture!r}; a cue-conflict "
                             f"stimulus in folder {category!r} must have shape {category!r} and one of the 16 "
                             "categories as texture")


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> the benchmark's input: ``ToTensor`` (/255) then ImageNet ``Normalize``."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float().div(255) - mean) / std


def load_stimuli(root: str | Path, name: str | None = None, per_category: int | None = None,
                 progress: bool = True, skip_bad_images: bool = False) -> Stimuli:
    """Decode ``root/<category>/<image>`` once; ``per_category`` keeps the first N images of each category.

    ``name`` (default: the folder's name) says which dataset it is; ``"cue-conflict"`` file names are checked.
    An undecodable image raises ``UnreadableStimulus`` naming it, or with ``skip_bad_images`` is left out
    and listed in ``Stimuli.skipped``.
    """
    root = Path(root)
    name = name or root.name
    if not root.is_dir():
        raise FileNotFoundError(f"stimulus folder {str(root)!r} does not exist; expected <category>/<image>.png "
                                f"inside (e.g. ../shared/data/texture-shape/cue-conflict)")
    if per_category is not None and (isinstance(per_category, bool) or not isinstance(per_category, int)
                                     or per_category < 1):
        raise ValueError(f"per_category={per_category!r} must be None or an int >= 1")
    folder = datasets.ImageFolder(str(root))  # lists classes and files the benchmark's way; decodes nothing
    _check_folder(root, name, folder)
    samples, taken = [], {}
    for path, label in folder.samples:
        if per_category is None or taken.get(label, 0) < per_category:
            taken[label] = taken.get(label, 0) + 1
            samples.append((path, folder.classes[label]))
    images, kept, skipped = [], [], []
    for path, category in _progress(samples, f"decode {name}", progress):
        try:
            images.append(_decode(path))
        except UnreadableStimulus:
            if not skip_bad_images:
                raise
            skipped.append(str(path))
            continue
        kept.append((path, category))
    if not kept:
        raise ValueError(f"stimulus folder {root}: no image could be decoded ({len(skipped)} skipped)")
    return Stimuli(name, torch.stack(images), [Path(p).name for p, _ in kept], [c for _, c in kept], skipped)


@torch.no_grad()
def evaluate(model: nn.Module, stimuli: Stimuli, batch_size: int = 64, device: str | torch.device = "cpu",
             desc: str | None = None, progress: bool = True) -> list[str]:
    """The model's 16-class decision for every stimulus (softmax, per-category mean, argmax)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
    model.eval()
    decisions: list[str] = []
    for start in _progress(range(0, len(stimuli), batch_size), desc or stimuli.name, progress):
        batch = normalize(stimuli.images[start:start + batch_size].to(device))
        decisions += decide(model(batch))
    return decisions


def responses_frame(decisions: list[str], stimuli: Stimuli, subj: str) -> "pd.DataFrame":
    """Decisions as the benchmark's raw-data rows (``rt`` and ``condition`` are ``NaN``, one session)."""
    if len(decisions) != len(stimuli):
        raise ValueError(f"{len(decisions)} decisions for {len(stimuli)} stimuli")
    columns = {"subj": subj, "session": 1, "trial": range(1, len(stimuli) + 1), "rt": float("nan"),
               "object_response": decisions, "category": stimuli.categories, "condition": float("nan"),
               "imagename": stimuli.imagenames}
    return optional("pandas").DataFrame(columns, columns=list(COLUMNS))


def csv_name(dataset: str, subj: str) -> str:
    """The benchmark's file name for a model's responses (its ``ResultPrinter`` turns ``_`` into ``-``)."""
    return f"{dataset}_{subj.replace('_', '-')}_session-1.csv"


def write_responses(frame: "pd.DataFrame", folder: str | Path, dataset: str) -> Path:
    """Write ``frame`` (one subj) to ``folder/<dataset>/<benchmark file name>``, byte for byte as the benchmark."""
    subjects = frame["subj"].unique()
    if len(subjects) != 1:
        raise ValueError(f"write one subj per file, got {list(subjects)}")
    path = Path(folder) / dataset / csv_name(dataset, subjects[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, na_rep="NaN", lineterminator="\r\n")  # csv.writer's ending, as the benchmark
    return path
