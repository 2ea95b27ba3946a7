"""Built-in texture–shape evaluator: the numbers model-vs-human gives, without installing it.

Stimuli are read as the benchmark's ``PytorchLoader`` reads them: a ``torchvision`` ``ImageFolder``
(classes and files in sorted order, PIL -> RGB), ``ToTensor`` and the ImageNet mean/std, with no
resizing because the texture–shape datasets are 224 x 224. Images of any other size get the
benchmark's resize branch, ``Resize(256)`` + ``CenterCrop(224)``. Each image is decoded once and kept
as uint8, so a K sweep normalizes batches on the fly instead of decoding again.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torchvision import datasets, transforms
from tqdm import tqdm

from .imagenet16 import IMAGENET_MEAN, IMAGENET_STD, decide
from .shape_bias import COLUMNS

DATASETS = ("cue-conflict", "edge", "silhouette")
IMAGE_SIZE = 224
_RESIZE = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(IMAGE_SIZE)])


@dataclass
class Stimuli:
    """Decoded images of one dataset (uint8, N x 3 x 224 x 224) with their file names and shape categories."""

    name: str
    images: torch.Tensor
    imagenames: list[str]
    categories: list[str]

    def __len__(self) -> int:
        return len(self.imagenames)


def _to_uint8(image) -> torch.Tensor:
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = _RESIZE(image)
    return transforms.functional.pil_to_tensor(image)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> the benchmark's input: ``ToTensor`` (/255) then ImageNet ``Normalize``."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float().div(255) - mean) / std


def load_stimuli(root: str | Path, name: str | None = None, per_category: int | None = None,
                 progress: bool = True) -> Stimuli:
    """Decode ``root/<category>/<image>`` once; ``per_category`` keeps the first N images of each category."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"stimulus folder {str(root)!r} does not exist; expected <category>/<image>.png "
                                f"inside (e.g. ../shared/data/texture-shape/cue-conflict)")
    if per_category is not None and per_category < 1:
        raise ValueError(f"per_category={per_category!r} must be None or an int >= 1")
    folder = datasets.ImageFolder(str(root))
    samples, taken = [], {}
    for path, label in folder.samples:
        if per_category is None or taken.get(label, 0) < per_category:
            taken[label] = taken.get(label, 0) + 1
            samples.append((path, folder.classes[label]))
    images = torch.stack([_to_uint8(folder.loader(path)) for path, _ in
                          tqdm(samples, desc=f"decode {name or root.name}", disable=not progress)])
    return Stimuli(name or root.name, images, [Path(p).name for p, _ in samples], [c for _, c in samples])


@torch.no_grad()
def evaluate(model: nn.Module, stimuli: Stimuli, batch_size: int = 64, device: str | torch.device = "cpu",
             desc: str | None = None, progress: bool = True) -> list[str]:
    """The model's 16-class decision for every stimulus (softmax, per-category mean, argmax)."""
    model.eval()
    decisions: list[str] = []
    for start in tqdm(range(0, len(stimuli), batch_size), desc=desc or stimuli.name, disable=not progress):
        batch = normalize(stimuli.images[start:start + batch_size].to(device))
        decisions += decide(model(batch))
    return decisions


def responses_frame(decisions: list[str], stimuli: Stimuli, subj: str) -> pd.DataFrame:
    """Decisions as the benchmark's raw-data rows (``rt`` and ``condition`` are ``NaN``, one session)."""
    if len(decisions) != len(stimuli):
        raise ValueError(f"{len(decisions)} decisions for {len(stimuli)} stimuli")
    return pd.DataFrame({"subj": subj, "session": 1, "trial": range(1, len(stimuli) + 1), "rt": float("nan"),
                         "object_response": decisions, "category": stimuli.categories, "condition": float("nan"),
                         "imagename": stimuli.imagenames}, columns=list(COLUMNS))


def csv_name(dataset: str, subj: str) -> str:
    """The benchmark's file name for a model's responses (its ``ResultPrinter`` turns ``_`` into ``-``)."""
    return f"{dataset}_{subj.replace('_', '-')}_session-1.csv"


def write_responses(frame: pd.DataFrame, folder: str | Path, dataset: str) -> Path:
    """Write ``frame`` (one subj) to ``folder/<dataset>/<benchmark file name>``, byte for byte as the benchmark."""
    subjects = frame["subj"].unique()
    if len(subjects) != 1:
        raise ValueError(f"write one subj per file, got {list(subjects)}")
    path = Path(folder) / dataset / csv_name(dataset, subjects[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, na_rep="NaN", lineterminator="\r\n")  # csv.writer's ending, as the benchmark
    return path
