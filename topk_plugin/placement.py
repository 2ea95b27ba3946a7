"""``"stage-ends"``: Top-K between the stages of any model, found from the model itself.

The paper's rule (supplementary §2): dense computation inside a stage, sparse communication
between stages. One probe forward finds the stages:

- maps (CNNs, hybrids, Swin-style channel-last maps): Top-K on the output of every stage, i.e. on
  the tensor that enters the outermost call lowering the spatial resolution by one step, and on
  the last feature map. Where a timm model lists its stages in ``feature_info``, those modules are
  used. The module named is the outermost one, called once, whose output is that tensor (a
  position that another position's module contains is avoided); a channel-last map gets
  ``kind="token"``.
- tokens (ViT, DeiT, EVA, CaiT, XCiT, LeViT...; the last feature is (N, T, D) and the trunk has
  at least two blocks): token Top-K on the input of each block's attention (of the block where it
  has none), its prefix tokens (CLS, registers) kept and not ranked.

The probe's input: ``example_input``, else a batch of one at ``input_size`` (C, H, W), else at the
model's own size (timm ``patch_embed.img_size``, then ``pretrained_cfg["input_size"]``; torchvision
``image_size``), else the first convolution's input channels at 224 x 224.
"""
from __future__ import annotations

import bisect
import itertools
import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ._probe import Call, first_tensor, record_calls
from .layers import TopK
from .spec import TopKSpec

# The paper's best K: 10% of positions for AlexNet's maps, 60% of tokens for ViT.
DEFAULT_K = {"maps": 0.1, "tokens": 0.6}
ATTENTION_NAMES = ("attn", "self_attn", "self_attention", "attention")
_MAX_PREFIX = 16  # CLS, distillation and register tokens
# Modules that only resize to the head's fixed input (AlexNet/VGG ``avgpool``) or pass their input on.
_NOT_A_STAGE = (nn.Identity, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class Stage:
    """One position chosen by ``stage-ends``, with what the probe saw there."""

    position: str
    kind: str
    shape: tuple
    num_prefix_tokens: int = 0


def model_prefix_tokens(model: nn.Module) -> int:
    """Leading tokens the model keeps out of its patch grid: timm's ``num_prefix_tokens``, torchvision's class token."""
    count = getattr(model, "num_prefix_tokens", None)
    if isinstance(count, int):
        return count
    return 1 if isinstance(getattr(model, "class_token", None), torch.Tensor) else 0


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The probe's (C, H, W) when the caller gives none (see the module docstring)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)  # timm: the size it was built for
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return (_first_conv_channels(model), *size)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return tuple(cfg["input_size"])
    size = getattr(model, "image_size", None)  # torchvision ViT
    if isinstance(size, int):
        return (3, size, size)
    return (_first_conv_channels(model), 224, 224)


def _first_conv_channels(model: nn.Module) -> int:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


def example_for(model: nn.Module, example_input=None, input_size=None):
    """The probe input: ``example_input`` as given, else a random batch of one at ``input_size``."""
    if example_input is not None and input_size is not None:
        raise ValueError("pass example_input or input_size, not both")
    if example_input is not None:
        return example_input
    size = default_input_size(model) if input_size is None else tuple(input_size)
    if len(size) != 3 or not all(isinstance(s, numbers.Integral) and s >= 1 for s in size):
        raise ValueError(f"input_size={input_size!r} must be (C, H, W), three ints >= 1")
    anchor = next(model.parameters(), None)
    device = anchor.device if anchor is not None else None
    dtype = anchor.dtype if anchor is not None and anchor.is_floating_point() else None
    return torch.randn(1, *size, device=device, dtype=dtype)


class _Geometry:
    """How a probe tensor reads: a spatial map (N, C, H, W), a channel-last map (N, H, W, D), tokens (N, T, D)."""

    def __init__(self, example):
        x = first_tensor(example)
        if x is None:
            raise ValueError("example_input holds no tensor")
        self.batch = x.shape[0]
        self.image = tuple(x.shape[-2:]) if x.dim() == 4 else None

    def _fits(self, h: int, w: int) -> bool:
        if self.image is None:
            return h == w
        big_h, big_w = self.image
        return h <= big_h and w <= big_w and abs(h * big_w - w * big_h) < big_h + big_w

    def map(self, t) -> tuple[str, tuple[int, int]] | None:
        """(kind, (H, W)) when ``t`` is a feature map of the probe batch (1 x 1 is a pooled vector), else None."""
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != self.batch:
            return None
        for kind, (h, w) in (("spatial", t.shape[2:]), ("token", t.shape[1:3])):
            if h * w > 1 and self._fits(h, w):
                return kind, (h, w)
        return None

    def area(self, t) -> int:
        layout = self.map(t)
        return math.prod(layout[1]) if layout else 0

    def tokens(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[0] == self.batch and t.shape[1] > 1


def _counts(calls: list[Call]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for call in calls:
        counts[call.name] = counts.get(call.name, 0) + 1
    return counts


def _producers(calls: list[Call], tensor, counts) -> list[str]:
    """Modules called once whose output is ``tensor`` itself, outermost (last to finish) first."""
    hits = [c for c in calls if c.output is tensor and counts[c.name] == 1 and not isinstance(c.module, _NOT_A_STAGE)]
    return [c.name for c in sorted(hits, key=lambda c: -c.end)]


def _contains(outer: str, inner: str) -> bool:
    outer, inner = outer.removeprefix("before:"), inner.removeprefix("before:")
    return inner.startswith(outer + ".")


def _choose(options: list[list[str]]) -> list[str]:
    """One name per stage, the outermost option that contains no other stage's choice."""
    picked = [0] * len(options)
    changed = True
    while changed:
        changed = False
        for i, names in enumerate(options):
            others = [options[j][picked[j]] for j in range(len(options)) if j != i]
            if picked[i] + 1 < len(names) and any(_contains(names[picked[i]], o) for o in others):
                picked[i] += 1
                changed = True
    return [names[p] for names, p in zip(options, picked)]


def _map_tensors(calls: list[Call], geo: _Geometry, example) -> list[tuple[torch.Tensor, Call | None]]:
    """Stage outputs in forward order, each with the call that lowers its resolution (None: the last map)."""
    attention = [c for c in calls if _is_attention(c.name, c.module)]
    calls = [c for c in calls if not any(c.inside(a) for a in attention)]  # attention maps, window partitions
    # The trunk's resolution when each call starts: the smallest map finished before it. Maps larger
    # than that (window partitions, decoders) are not stage ends.
    finished = sorted((c.end, geo.area(c.output)) for c in calls if geo.area(c.output))
    ends, lowest = [end for end, _ in finished], list(itertools.accumulate((a for _, a in finished), min))
    image = geo.area(first_tensor(example)) or math.inf

    def trunk(call: Call) -> float:
        i = bisect.bisect_left(ends, call.start)
        return min(image, lowest[i - 1]) if i else image

    # A drop at least halves the area (a valid 3x3 convolution trimming a border is no drop).
    drops = [(c, geo.area(c.input), geo.area(c.output)) for c in calls]
    drops = [(c, a, b) for c, a, b in drops if a and b and 2 * b <= a and a <= trunk(c)]
    levels = sorted({area for _, a, b in drops for area in (a, b)}, reverse=True)
    step = [c for c, a, b in drops if levels.index(b) == levels.index(a) + 1]
    outer = [c for c in step if not any(c.inside(o) for o in step)]
    found: list[tuple[torch.Tensor, Call | None]] = []
    for call in outer:
        if call.input is not first_tensor(example) and all(call.input is not t for t, _ in found):
            found.append((call.input, call))
    last = max((c for c in calls if geo.area(c.output) and geo.area(c.output) <= trunk(c)
                and not isinstance(c.module, _NOT_A_STAGE)), key=lambda c: c.end, default=None)
    if last is not None and all(last.output is not t for t, _ in found):
        found.append((last.output, None))
    return found


def _from_feature_info(model: nn.Module, calls: list[Call], geo: _Geometry, counts) -> list[Stage] | None:
    """timm's own stage list, when every entry is a module called once that outputs a feature map."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list) or not info or not all(isinstance(e, dict) and "module" in e for e in info):
        return None
    by_name = {c.name: c for c in calls}
    stages = []
    for entry in info:
        call = by_name.get(entry["module"])
        if call is None or counts[call.name] != 1 or geo.map(call.output) is None:
            return None
        stages.append(Stage(call.name, geo.map(call.output)[0], tuple(call.output.shape)))
    return stages


def _map_stages(model: nn.Module, calls: list[Call], geo: _Geometry, example) -> list[Stage]:
    counts = _counts(calls)
    from_timm = _from_feature_info(model, calls, geo, counts)
    if from_timm:
        return from_timm
    options, tensors = [], []
    for tensor, consumer in _map_tensors(calls, geo, example):
        names = _producers(calls, tensor, counts)
        if not names and consumer is not None and counts[consumer.name] == 1:
            names = [f"before:{consumer.name}"]  # made by a function, not a module: sparsify where it is read
        if names:
            options.append(names)
            tensors.append(tensor)
    return [Stage(name, geo.map(t)[0], tuple(t.shape)) for name, t in zip(_choose(options), tensors)]


def _is_attention(name: str, module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention) or name.rpartition(".")[2] in ATTENTION_NAMES:
        return True
    return any("Attention" in cls.__name__ or "Attn" in cls.__name__ for cls in type(module).__mro__)


def _token_blocks(model: nn.Module, calls: list[Call], geo: _Geometry, counts) -> list[tuple[Call, Call | None]]:
    """The trunk's blocks: token-to-token calls, called once, held by a Sequential or ModuleList, each with
    its attention. Where blocks have attention, the innermost blocks holding one (not the stages around
    them, nor the dropouts and position convolutions between them); else the outermost blocks."""
    modules = dict(model.named_modules())
    attention = [c for c in calls if counts[c.name] == 1 and _is_attention(c.name, c.module) and geo.tokens(c.input)]
    candidates = [
        c for c in calls
        if counts[c.name] == 1 and geo.tokens(c.input) and geo.tokens(first_tensor(c.output))
        and isinstance(modules.get(c.name.rpartition(".")[0]), (nn.Sequential, nn.ModuleList))
        and not any(c.inside(a) for a in attention)]
    paired = [(c, next((a for a in attention if a.inside(c) and a.input.shape[1] == c.input.shape[1]), None))
              for c in candidates]
    attended = [c for c, a in paired if a is not None]
    if attended:
        return [(c, a) for c, a in paired if a is not None and not any(o.inside(c) for o in attended)]
    return [(c, None) for c in candidates if not any(c.inside(o) for o in candidates)]


def _num_patches(model: nn.Module) -> int | None:
    count = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    return count if isinstance(count, int) else None


def _prefix_tokens(tokens: int, patches: int | None, model_prefix: int, square: bool) -> int:
    """Leading tokens outside the patch grid at one position: the model's patch count where it matches,
    else what a square grid leaves over (a square probe image; CLS and register tokens are few)."""
    if patches is not None and 0 <= tokens - patches <= max(model_prefix, _MAX_PREFIX):
        return tokens - patches
    if square and tokens - math.isqrt(tokens) ** 2 <= _MAX_PREFIX:
        return tokens - math.isqrt(tokens) ** 2
    return model_prefix if model_prefix < tokens else 0


def _token_stages(model: nn.Module, calls: list[Call], geo: _Geometry) -> list[Stage]:
    blocks = _token_blocks(model, calls, geo, _counts(calls))
    if len(blocks) < 2:
        return []
    model_prefix, patches = model_prefix_tokens(model), _num_patches(model)
    square = geo.image is not None and geo.image[0] == geo.image[1]
    stages = []
    for block, attention in blocks:
        target = attention or block
        prefix = _prefix_tokens(target.input.shape[1], patches, model_prefix, square)
        stages.append(Stage(f"before:{target.name}", "token", tuple(target.input.shape), prefix))
    return stages


def _ends_in_tokens(calls: list[Call], geo: _Geometry) -> bool:
    """Is the last feature the model computes (N, T, D) tokens rather than a map?"""
    for call in sorted(calls, key=lambda c: -c.end):
        if geo.tokens(call.output):
            return True
        if geo.area(call.output):
            return False
    return False


def find_stages(model: nn.Module, *, example_input=None, input_size=None) -> tuple[list[Stage], str]:
    """The stage ends of ``model`` and whether they are ``"maps"`` or ``"tokens"`` (one probe forward)."""
    example = example_for(model, example_input, input_size)
    geo = _Geometry(example)
    calls = record_calls(model, example, skip=lambda name, module: isinstance(module, TopK))
    if _ends_in_tokens(calls, geo):
        stages = _token_stages(model, calls, geo)
        if stages:
            return stages, "tokens"
    stages = _map_stages(model, calls, geo, example)
    if not stages:
        shape = tuple(first_tensor(example).shape)
        raise ValueError(
            f"stage-ends found no stage in {type(model).__name__} on an input of shape {shape}: no call lowers a "
            "feature map's resolution and no trunk of token blocks was found. Pass positions instead: "
            "list_positions(model, example_input) shows every module with its output shape")
    return stages, "maps"


def stage_ends(model: nn.Module, k=None, *, example_input=None, input_size=None) -> list[TopKSpec]:
    """One ``TopKSpec`` per stage end of ``model`` (see the module docstring).

    Args:
        k: one value for every stage, or a sequence with one per stage; ``None`` takes the paper's
            best (``DEFAULT_K``: 0.1 on maps, 0.6 on tokens).
        example_input, input_size: the probe's input (a tensor, a tuple of arguments, a dict of keywords),
            or its (C, H, W); by default the model's own input size.
    """
    stages, family = find_stages(model, example_input=example_input, input_size=input_size)
    ks = per_stage(DEFAULT_K[family] if k is None else k, [s.position for s in stages])
    return [TopKSpec([s.position], k=kk, kind=s.kind, num_prefix_tokens=s.num_prefix_tokens)
            for s, kk in zip(stages, ks)]


def per_stage(k, positions: Sequence[str]) -> list:
    """``k`` repeated for every placement, or a sequence checked to hold exactly one per placement."""
    if isinstance(k, (str, bytes)) or not isinstance(k, Sequence):
        return [k] * len(positions)
    if len(k) != len(positions):
        raise ValueError(f"k has {len(k)} values for {len(positions)} placements {list(positions)}; "
                         "pass one k, or one per placement")
    return list(k)


# Placements computed from the model, by name; they share the string namespace of presets.
COMPUTED = {"stage-ends": stage_ends}
