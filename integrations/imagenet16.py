"""The 16 entry-level categories of the texture–shape stimuli and their ImageNet classes.

The category -> ImageNet-index table is the one model-vs-human uses
(``modelvshuman/helper/human_categories.py``, ``HumanCategories.<category>_indices``; Geirhos et al.
2019). A 1000-way softmax becomes a 16-way decision as the benchmark's
``ImageNetProbabilitiesTo16ClassesMapping`` does it: each category's probability is the MEAN of the
probabilities of its ImageNet classes, and the largest one is the decision.
"""
from __future__ import annotations

import torch

# The normalisation every ImageNet-trained torchvision/timm model (and the benchmark's loader) expects.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGENET_INDICES: dict[str, tuple[int, ...]] = {
    "airplane": (404,),
    "bear": (294, 295, 296, 297),
    "bicycle": (444, 671),
    "bird": (8, 10, 11, 12, 13, 14, 15, 16, 18, 19, 20, 22, 23, 24, 80, 81, 82, 83, 87, 88, 89, 90, 91, 92, 93,
             94, 95, 96, 98, 99, 100, 127, 128, 129, 130, 131, 132, 133, 135, 136, 137, 138, 139, 140, 141, 142,
             143, 144, 145),
    "boat": (472, 554, 625, 814, 914),
    "bottle": (440, 720, 737, 898, 899, 901, 907),
    "car": (436, 511, 817),
    "cat": (281, 282, 283, 284, 285, 286),
    "chair": (423, 559, 765, 857),
    "clock": (409, 530, 892),
    "dog": tuple(range(152, 192)) + tuple(range(193, 204)) + tuple(range(205, 227)) + tuple(range(228, 242))
    + tuple(range(243, 251)) + tuple(range(252, 258)) + (259, 261, 262, 263, 265, 266, 267, 268),
    "elephant": (385, 386),
    "keyboard": (508, 878),
    "knife": (499,),
    "oven": (766,),
    "truck": (555, 569, 656, 675, 717, 734, 864, 867),
}
CATEGORIES: tuple[str, ...] = tuple(sorted(IMAGENET_INDICES))
NUM_IMAGENET_CLASSES = 1000


def averaging_matrix(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """(1000, 16) matrix ``W`` with ``probs @ W`` = per-category mean probability, columns in ``CATEGORIES`` order."""
    weights = torch.zeros(NUM_IMAGENET_CLASSES, len(CATEGORIES), dtype=dtype, device=device)
    for column, category in enumerate(CATEGORIES):
        indices = IMAGENET_INDICES[category]
        weights[list(indices), column] = 1.0 / len(indices)
    return weights


def category_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(N, 16) mean softmax probability of each category's ImageNet classes, from (N, 1000) logits."""
    if logits.dim() != 2 or logits.shape[1] != NUM_IMAGENET_CLASSES:
        raise ValueError(f"expected (N, {NUM_IMAGENET_CLASSES}) ImageNet logits, got shape {tuple(logits.shape)}")
    # The benchmark takes the softmax in float32 (a torch.Tensor of the logits), then averages.
    probabilities = logits.float().softmax(dim=1)
    return probabilities @ averaging_matrix(probabilities.dtype, probabilities.device)


def decide(logits: torch.Tensor) -> list[str]:
    """The 16-class decision (a category name) for each row of (N, 1000) ImageNet logits."""
    return [CATEGORIES[i] for i in category_probabilities(logits).argmax(dim=1).tolist()]
