"""What ``sparsify`` accepts as a spec, and the text form recipes read from a command line.

``parse_spec(text)`` turns a command-line string into a spec:
  ``"features.2,features.5"``               positions (a comma list; a single name stays a string)
  ``"paper"``, ``"stage-ends"``             a preset or a computed placement, resolved per model
  ``"preset:stages"``                       a preset or placement, explicitly
  ``'{"positions": ["layer2"], "k": 0.2}'`` JSON: ``TopKSpec`` fields, a list of them, or a list of positions

``as_specs(model, spec)`` turns any accepted spec into a list of ``TopKSpec`` for ``model``. Preset names,
computed placements and module names share one string namespace: a string that is both a preset and a
module of the model is refused, with how to say each (``preset:NAME`` / ``after:NAME``).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Sequence

from torch import nn

from .placement import COMPUTED
from .presets import get_preset, preset_names
from .spec import TopKSpec

PRESET_PREFIX = "preset:"
_FIELDS = tuple(f.name for f in dataclasses.fields(TopKSpec))


def _spec_from_fields(fields) -> TopKSpec:
    if not isinstance(fields, dict):
        raise ValueError(f"{fields!r} is not a dict of TopKSpec fields {list(_FIELDS)}")
    unknown = sorted(set(fields) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown TopKSpec field(s) {unknown}; the fields are {list(_FIELDS)}")
    return TopKSpec(**fields)


def parse_spec(text: str):
    """A spec from command-line text (see the module docstring); ``ValueError`` names what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"spec {text!r} is empty; give positions ('features.2,features.5'), a preset name, or JSON")
    text = text.strip()
    if text[0] in "[{":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"spec {text!r} is not valid JSON: {err}") from None
        if isinstance(value, dict):
            return _spec_from_fields(value)
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return [_spec_from_fields(v) for v in value]
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return value
        raise ValueError(f"spec {text!r}: JSON must be an object of TopKSpec fields, a non-empty list of them, "
                         "or a non-empty list of positions")
    if "," not in text:
        return text
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise ValueError(f"spec {text!r} has an empty position between commas")
    return items


def named_placements() -> list[str]:
    """Names a spec string may use for a whole placement: the presets and the computed placements."""
    return sorted(set(preset_names()) | set(COMPUTED))


def _named(model: nn.Module, text: str, probe: dict) -> list[TopKSpec] | None:
    """The placement a name selects, or None when ``text`` is no preset/placement name (a position then)."""
    explicit = text.startswith(PRESET_PREFIX)
    name = text[len(PRESET_PREFIX):] if explicit else text
    if name not in COMPUTED and name not in preset_names():
        if explicit:
            raise ValueError(f"unknown preset {name!r}; presets and placements: {named_placements()}")
        return None
    if not explicit and name in dict(model.named_modules()):
        raise ValueError(f"{name!r} is both a preset and a module of {type(model).__name__}; "
                         f"say {PRESET_PREFIX + name!r} for the preset or 'after:{name}' for Top-K on the module")
    if name in COMPUTED:
        return COMPUTED[name](model, **probe)
    return [get_preset(name, model).spec]


def as_specs(model: nn.Module, spec, *, example_input=None, input_size=None) -> list[TopKSpec]:
    """Every form ``sparsify`` accepts (a name, positions, a dict of fields, a ``TopKSpec``, a list of
    ``TopKSpec``) as a list of ``TopKSpec`` for ``model``. ``example_input`` / ``input_size`` feed the
    probe of a computed placement (``"stage-ends"``) and are refused for any other spec."""
    probe = {"example_input": example_input, "input_size": input_size}
    computed = isinstance(spec, str) and spec.removeprefix(PRESET_PREFIX) in COMPUTED
    if not computed and (example_input is not None or input_size is not None):
        raise ValueError(f"example_input/input_size are read only by the computed placements {sorted(COMPUTED)}, "
                         f"not by spec={spec!r}")
    if isinstance(spec, TopKSpec):
        return [spec]
    if isinstance(spec, dict):
        return [_spec_from_fields(spec)]
    if isinstance(spec, str):
        return _named(model, spec, probe) or [TopKSpec([spec])]
    if isinstance(spec, type):
        return [TopKSpec([spec])]
    if isinstance(spec, Sequence) and spec and all(isinstance(s, TopKSpec) for s in spec):
        return list(spec)
    if isinstance(spec, Sequence) and all(isinstance(s, (str, type)) for s in spec):
        return [TopKSpec(list(spec))]
    raise ValueError(f"spec={spec!r} is not understood; pass a preset or placement name {named_placements()}, "
                     "module names, a dict of TopKSpec fields, a TopKSpec or a list of TopKSpec")
