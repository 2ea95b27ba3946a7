"""Bridges to other tools: model-vs-human (shape bias) and torch-fidelity (FID/KID).

The base install has neither pandas nor tqdm; the modules here import them on first use through
``optional`` so that importing ``topk_plugin.integrations`` never fails, and a missing one names the extra.
"""
from __future__ import annotations

import importlib
from types import ModuleType

EXTRA = "integrations"


def optional(module: str, extra: str = EXTRA) -> ModuleType:
    """``import module``, or an ``ImportError`` naming the ``topk-plugin`` extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{module} is not installed; it comes with pip install \"topk-plugin[{extra}]\" "
                          f"({err})") from err
