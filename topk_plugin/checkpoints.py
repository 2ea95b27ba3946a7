"""One checkpoint loader for every model and recipe.

``read_checkpoint``   a file to Python objects, without running code from it (``weights_only``); a clear
                      ``CheckpointError`` naming the file when it is missing, truncated or not a checkpoint.
``unwrap_state_dict`` the flat ``{name: tensor}`` inside any usual container (``state_dict``, ``model``, ``net``,
                      ``g_ema``, ``g``, an ``nn.Module``, nested), with every ``module`` path component
                      (``nn.DataParallel``, also on a submodule: ``features.module.0.weight``) removed.
``load_checkpoint``   unwrap, rename, realign ``nn.Sequential`` indices shifted by parameter-free layers
                      (the authors' Top-K VGG16/AlexNet files: ``features.6.weight`` is dense
                      ``features.5.weight``), then load strictly or raise a ``CheckpointError`` listing every
                      missing and unexpected key with its closest counterpart and every shape mismatch.

A sparsified model loads the dense model's files unchanged: ``sparsify`` keeps every parameter name and its
Top-K layers hold no state.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Union

import torch
from torch import nn

#: Container keys searched, in this order, for the state dict inside a checkpoint dict.
CONTAINER_KEYS = ("state_dict", "model", "net", "g_ema", "g")
_LISTED = 12  # keys shown per category in an error message

Source = Union[str, Path, Mapping, nn.Module]


class CheckpointError(ValueError):
    """A checkpoint cannot be read, unwrapped or loaded; the message names the file and what is wrong."""


# ----------------------------------------------------------------------------- reading

def _data_globals() -> list:
    """Plain-data classes that old checkpoints pickle beside their tensors (numpy scalars, argparse options).

    Constructing them runs no code from the file, so ``weights_only`` loading may accept them.
    """
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    scalar = core.multiarray.scalar
    dtypes = {type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_)}
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes, argparse.Namespace]


def _pickled_global(message: str) -> str | None:
    found = re.search(r"GLOBAL (\S+)", message)
    return found.group(1) if found else None


def read_checkpoint(path: str | Path, *, weights_only: bool = True) -> Any:
    """The objects saved in ``path`` (tensors on CPU).

    ``weights_only=True`` (default) never runs code from the file. A file holding a whole pickled model
    (``torch.save(model)``) needs ``weights_only=False``, which executes code from the file: pass it
    only for files you trust.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    allowed = safe_globals(_data_globals()) if safe_globals is not None else contextlib.nullcontext()
    try:
        with allowed:
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        needed = _pickled_global(str(err))
        if needed is not None:
            raise CheckpointError(
                f"checkpoint {str(path)!r} pickles {needed}: a whole saved model (or another object that needs "
                "code to load) rather than a state_dict. Reading it runs code from the file; if you trust it, use "
                "read_checkpoint(path, weights_only=False) (and save model.state_dict() for next time)") from None
        raise _unreadable(path, err) from None
    except (ImportError, AttributeError) as err:  # weights_only=False: the pickled classes are not importable
        raise CheckpointError(f"checkpoint {str(path)!r} pickles objects whose code is not importable here "
                              f"({type(err).__name__}: {err}); save its state_dict where that code exists") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as err:
        raise _unreadable(path, err) from None  # how torch reports truncated archives, short files, plain text


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    """The error for a damaged file, with torch's own diagnosis but not its unrelated weights_only advice."""
    text = str(err)
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    detail = unpickler.group(1).strip() if unpickler else text.split(". ")[0].strip()
    return CheckpointError(f"checkpoint {str(path)!r} is truncated or not a PyTorch checkpoint "
                           f"({type(err).__name__}{': ' + detail if detail else ''})")


def _read_safetensors(path: Path) -> dict:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"checkpoint {str(path)!r} is a safetensors file; pip install safetensors") from None
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file ({err})") from None


# ----------------------------------------------------------------------------- unwrapping

def _strip_module(key: str) -> str:
    """``key`` without ``module`` path components (DataParallel / DistributedDataParallel wrappers)."""
    return ".".join(part for part in key.split(".") if part != "module")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj)
        return f"a dict with keys {keys[:_LISTED]}{' ...' if len(keys) > _LISTED else ''}"
    return f"a {type(obj).__name__}"


def _find_state_dict(obj: Any, key: str | None, where: str) -> Mapping:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            raise CheckpointError(f"{where}: no entry {key!r} in {_describe(obj)}")
        return _find_state_dict(obj[key], None, f"{where}[{key!r}]")
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping):
        if isinstance(obj.get("g_ema"), (list, tuple)) and "g" in obj:
            raise CheckpointError(
                f"{where} holds 'g' and 'g_ema' as a list of parameters (a FastGAN all_*.pth file): the EMA "
                "weights have no names without the model. Use load_checkpoint(generator, ...) (it applies "
                "'g_ema' over 'g' in the generator's parameter order) or pass key='g' for the raw generator")
        for name in CONTAINER_KEYS:
            if isinstance(obj.get(name), (Mapping, nn.Module)):
                return _find_state_dict(obj[name], None, f"{where}[{name!r}]")
    raise CheckpointError(f"{where} holds {_describe(obj)}, not a state_dict; expected tensors by name, or one "
                          f"under {list(CONTAINER_KEYS)} (pass key=... to pick another entry)")


def unwrap_state_dict(obj: Any, *, key: str | None = None, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The flat state dict inside ``obj``, ``module`` path components removed.

    Args:
        obj: a state dict, a dict holding one under ``CONTAINER_KEYS`` (searched in that order, nested), or
            an ``nn.Module``.
        key: pick this entry of the top-level dict instead of searching (``"d"`` for FastGAN's discriminator).
        where: how messages name ``obj`` (``read_checkpoint``'s path, for instance).
    """
    state = _find_state_dict(obj, key, where)
    flat: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}: entry {name!r} is {_describe(value)}, not a tensor")
        short = _strip_module(name)
        if short in flat:
            raise CheckpointError(f"{where}: keys {name!r} and another both mean {short!r} once 'module.' is dropped")
        flat[short] = value
    return flat


# ----------------------------------------------------------------------------- index realignment

def _natural(key: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("."))


def _children(shapes: Mapping[str, tuple], prefix: str) -> dict[int, dict[str, tuple]]:
    """``{index: {rest: shape}}`` for the keys ``prefix.<index>.rest``."""
    groups: dict[int, dict[str, tuple]] = {}
    start = len(prefix) + 1 if prefix else 0
    for key, shape in shapes.items():
        if prefix and not key.startswith(prefix + "."):
            continue
        head, _, rest = key[start:].partition(".")
        if head.isdigit() and rest:
            groups.setdefault(int(head), {})[rest] = shape
    return groups


def _signature(group: Mapping[str, tuple]) -> tuple:
    """What a child holds, its own inner indices blurred (they are realigned at the next depth)."""
    return tuple((re.sub(r"\d+", "#", rest), group[rest]) for rest in sorted(group, key=_natural))


def _index_prefixes(keys) -> list[str]:
    """Every path followed by an integer component (``features`` in ``features.5.weight``), shallow first."""
    prefixes = set()
    for key in keys:
        parts = key.split(".")
        prefixes.update(".".join(parts[:i]) for i, part in enumerate(parts[:-1]) if part.isdigit())
    return sorted(prefixes, key=lambda p: (p.count(".") + bool(p), p))


def _realign(state: dict[str, torch.Tensor], expected: Mapping[str, tuple]) -> dict[str, torch.Tensor]:
    """Rename ``P.M.rest`` to ``P.N.rest`` where container ``P`` holds the same parameterised children in the
    same order, by shape, at other indices (parameter-free layers inserted or removed between them)."""
    if set(state) == set(expected):
        return state
    for prefix in _index_prefixes(expected):
        have = _children({k: tuple(v.shape) for k, v in state.items()}, prefix)
        want = _children(expected, prefix)
        if sorted(have) == sorted(want) or len(have) != len(want):
            continue
        pairs = list(zip(sorted(have), sorted(want)))
        if any(_signature(have[m]) != _signature(want[n]) for m, n in pairs):
            continue
        index_of = dict(pairs)
        head = prefix + "." if prefix else ""
        renamed = {}
        for key, value in state.items():
            if key.startswith(head):
                index, _, rest = key[len(head):].partition(".")
                if index.isdigit() and rest:
                    key = f"{head}{index_of[int(index)]}.{rest}"
            renamed[key] = value
        state = renamed
    return state


# ----------------------------------------------------------------------------- loading

def _apply_key_map(state: dict[str, torch.Tensor], key_map: Callable[[str], str | None], where: str):
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key_map(key)
        if new is None:
            continue
        if new in mapped:
            raise CheckpointError(f"{where}: key_map sends two keys to {new!r} (one of them is {key!r})")
        mapped[new] = value
    return mapped


def _ema_overlay(obj: Mapping, model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Replace ``state``'s parameters by FastGAN's ``g_ema`` list, paired in ``model.parameters()`` order."""
    names = [name for name, _ in model.named_parameters()]
    ema = obj["g_ema"]
    if len(ema) != len(names):
        raise CheckpointError(f"{where}['g_ema'] holds {len(ema)} tensors; {type(model).__name__} has "
                              f"{len(names)} parameters")
    for name, tensor in zip(names, ema):
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(state.get(name, tensor).shape):
            raise CheckpointError(f"{where}['g_ema'] does not fit parameter {name!r} of {type(model).__name__} "
                                  "in order and shape")
        state[name] = tensor


def _closest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.8)
    return f" (closest: {close[0]})" if close else ""


def _listing(title: str, lines: list[str]) -> str:
    shown = lines[:_LISTED]
    more = f"\n    ... and {len(lines) - _LISTED} more" if len(lines) > _LISTED else ""
    return f"\n  {title} ({len(lines)}):\n    " + "\n    ".join(shown) + more


def _mismatch_message(where: str, model: nn.Module, expected, missing, unexpected, shapes) -> str:
    found = len(expected) - len(missing)
    text = f"{where} does not fit {type(model).__name__} ({found} of its {len(expected)} keys found):"
    if missing:
        text += _listing("missing from the checkpoint", [k + _closest(k, unexpected) for k in missing])
    if unexpected:
        text += _listing("unexpected in the checkpoint", [k + _closest(k, missing) for k in unexpected])
    if shapes:
        text += _listing("shape mismatches (checkpoint vs model)", shapes)
    return text + ("\n  Is it the right architecture (and num_classes)? A model-specific renaming goes in "
                   "load_checkpoint(..., key_map=...)")


def load_checkpoint(model: nn.Module, source: Source, *, key: str | None = None,
                    key_map: Callable[[str], str | None] | None = None, strict: bool = True) -> nn.Module:
    """Load ``source`` into ``model`` (dense or sparsified) and return ``model``.

    Args:
        source: a checkpoint path (read with ``read_checkpoint``), a dict as saved, or an ``nn.Module``.
        key: take this entry of the checkpoint dict instead of searching ``CONTAINER_KEYS``.
        key_map: model-specific renaming applied to every unwrapped key; returning ``None`` drops the key.
        strict: ``True`` requires every key to match; ``False`` loads the matching keys and warns about the rest.
            A shape mismatch, or no matching key at all, is an error either way.

    Raises:
        CheckpointError: unreadable file, no state dict inside, or keys / shapes that do not fit, listing each
            missing and unexpected key with its closest counterpart.
    """
    where = f"checkpoint {str(source)!r}" if isinstance(source, (str, Path)) else "checkpoint"
    obj = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    target = model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
    ema = (key is None and isinstance(obj, Mapping) and isinstance(obj.get("g_ema"), (list, tuple))
           and isinstance(obj.get("g"), Mapping))
    state = unwrap_state_dict(obj, key="g" if ema else key, where=where)
    if key_map is not None:
        state = _apply_key_map(state, key_map, where)
    expected = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    by_short_name = {_strip_module(k): k for k in expected}  # models that name a submodule "module" keep it
    state = {by_short_name.get(k, k): v for k, v in state.items()}
    state = _realign(state, expected)
    if ema:
        _ema_overlay(obj, target, state, where)

    missing = sorted((k for k in expected if k not in state), key=_natural)
    unexpected = sorted((k for k in state if k not in expected), key=_natural)
    shapes = [f"{k}: {tuple(state[k].shape)} vs {expected[k]}" for k in sorted(expected, key=_natural)
              if k in state and tuple(state[k].shape) != expected[k]]
    if shapes or (strict and (missing or unexpected)) or (expected and len(missing) == len(expected)):
        raise CheckpointError(_mismatch_message(where, target, expected, missing, unexpected, shapes))
    if missing or unexpected:
        warnings.warn(_mismatch_message(where, target, expected, missing, unexpected, []), stacklevel=2)
    target.load_state_dict(state, strict=strict)
    return model
