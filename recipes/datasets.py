"""Image classification splits for the recipes: folders of class folders, by file list, never copied.

Two layouts, both read in place:
  * a root with ``train/<class>/`` and ``val/<class>/`` (any ImageFolder pair, e.g. ImageNet with val sorted
    into class folders); ``classes`` restricts both to those class folders (the IN-S1/IN-S2 wnids);
  * a root of class folders only (``few-shot/{jeep,fish,...}``): a seeded per-class held-out split.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset
from tqdm import tqdm

from topk_plugin.recipes._common import UnreadableImage, image_files, read_image, require_dir

# The paper's two 10-class ImageNet-1k subsets (supplementary, Top-K training experiment).
SUBSETS = {
    "in-s1": ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
              "n03394916", "n03417042", "n03425413", "n03445777", "n03888257"),
    "in-s2": ("n01871265", "n03063599", "n03065424", "n03100240", "n03201208",
              "n03208938", "n03216828", "n03249569", "n03443371", "n03447721"),
}

Sample = tuple[Path, int]


@dataclass
class Splits:
    """Train and val samples as (path, class index), with the class names they index."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]

    def limit(self, per_class: int | None, seed: int) -> "Splits":
        """At most ``per_class`` samples of each class in each split (a seeded choice)."""
        if per_class is None:
            return self
        return Splits(self.classes, _cap(self.train, per_class, seed), _cap(self.val, per_class, seed))


class BadImageError(Exception):
    """An unreadable image met while loading. An ``Exception``, not ``SystemExit``: a DataLoader worker passes
    only those on to the main process, where ``bad_images_exit`` turns it back into the one-line exit."""


class FileListDataset(Dataset):
    """(image, label) from a list of (path, label); images are decoded fully, as RGB."""

    def __init__(self, samples: Sequence[Sample], transform=None):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = read_image(path)
        except UnreadableImage as err:
            raise BadImageError(str(err)) from None
        return (self.transform(image) if self.transform else image), label


@contextmanager
def bad_images_exit():
    """Inside: a ``BadImageError`` from a loader (re-raised by its worker with a traceback) exits naming the file."""
    try:
        yield
    except BadImageError as err:
        last_line = str(err).strip().splitlines()[-1]  # a worker's copy ends "<module>.BadImageError: <message>"
        raise UnreadableImage(last_line.split(f"{BadImageError.__name__}: ", 1)[-1]) from None


def drop_unreadable(samples: Sequence[Sample], what: str) -> tuple[list[Sample], list[Path]]:
    """(the samples whose image decodes, the paths of those that do not): ``--skip-bad-images``."""
    kept, bad = [], []
    for sample in tqdm(samples, desc=f"checking {what} images", unit="img", leave=False):
        try:
            read_image(sample[0])
            kept.append(sample)
        except UnreadableImage:
            bad.append(sample[0])
    return kept, bad


def class_folders(root: Path, what: str) -> list[str]:
    """Sorted names of the sub-folders of ``root`` that hold images."""
    root = require_dir(root, what)
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and image_files(p))
    if not names:
        raise SystemExit(f"{what} {root} has no class folders with images in them")
    return names


def folder_samples(root: Path, classes: Sequence[str]) -> list[Sample]:
    """Every image of ``root/<class>/`` for the given classes, labelled by their index in ``classes``."""
    return [(path, label) for label, name in enumerate(classes) for path in image_files(Path(root) / name)]


def _select(root: Path, found: list[str], wanted: Sequence[str] | None, what: str) -> list[str]:
    if wanted is None:
        return found
    missing = [c for c in wanted if c not in found]
    if missing:
        raise SystemExit(f"{what} {root} lacks {len(missing)} of the {len(wanted)} requested classes: "
                         f"{missing} (it has {len(found)} class folders, e.g. {found[:5]})")
    return list(wanted)


def split_folders(root: Path, classes: Sequence[str] | None = None) -> Splits:
    """``root/train`` and ``root/val`` class folders; both must hold the same classes."""
    root = Path(root)
    train = _select(root / "train", class_folders(root / "train", "train folder"), classes, "train folder")
    val = _select(root / "val", class_folders(root / "val", "val folder"), classes, "val folder")
    if train != val:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise SystemExit(f"class mismatch between {root / 'train'} and {root / 'val'}: only in train {only_train}, "
                         f"only in val {only_val}; pass a class subset that both hold")
    return Splits(train, folder_samples(root / "train", train), folder_samples(root / "val", train))


def held_out_split(root: Path, val_fraction: float, seed: int) -> Splits:
    """A root of class folders split per class: ``val_fraction`` of each (at least one image) is held out."""
    if not 0.0 < val_fraction < 1.0:
        raise SystemExit(f"--val-fraction {val_fraction} must lie in (0, 1)")
    classes = class_folders(root, "data folder")
    rng = random.Random(seed)
    train, val = [], []
    for label, name in enumerate(classes):
        paths = image_files(Path(root) / name)
        rng.shuffle(paths)
        cut = max(1, round(val_fraction * len(paths)))
        val += [(p, label) for p in sorted(paths[:cut])]
        train += [(p, label) for p in sorted(paths[cut:])]
    return Splits(classes, train, val)


def load_splits(root: Path, subset: str | None = None, val_fraction: float = 0.2, seed: int = 0) -> Splits:
    """Splits from ``root``: ``train/`` + ``val/`` folders if present (restricted to ``subset``), else held out."""
    root = require_dir(root, "data folder")
    if subset is not None and subset not in SUBSETS:
        raise SystemExit(f"--subset {subset!r} is unknown; choose one of {sorted(SUBSETS)}")
    if (root / "train").is_dir() or (root / "val").is_dir() or subset is not None:
        return split_folders(root, SUBSETS[subset] if subset else None)
    return held_out_split(root, val_fraction, seed)


def _cap(samples: list[Sample], per_class: int, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    by_label: dict[int, list[Sample]] = {}
    for sample in samples:
        by_label.setdefault(sample[1], []).append(sample)
    return [s for label in sorted(by_label) for s in sorted(rng.sample(by_label[label], min(per_class,
                                                                                         len(by_label[label]))))]
