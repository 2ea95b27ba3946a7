"""topk-plugin: spatial / token Top-K activation sparsity for any PyTorch model.

Reproduces "Emergence of Shape Bias in Convolutional Neural Networks through Activation
Sparsity" (Li, Wen, Li, Lee, NeurIPS 2023) as reusable model surgery.
"""
from .layers import TopK
from .ops import keep_count, topk, topk_mask
from .presets import Preset, get_preset, list_presets, preset_names, register_preset
from .spec import TopKSpec
from .surgery import (SparsifiedGraphModule, Table, desparsify, is_sparsified, list_positions, set_k,
                      sparsify, sparsity_report, topk_layers)

__version__ = "0.1.0"

__all__ = [
    "TopK", "TopKSpec", "Preset", "SparsifiedGraphModule", "Table",
    "sparsify", "desparsify", "set_k", "list_positions", "sparsity_report", "topk_layers", "is_sparsified",
    "topk", "topk_mask", "keep_count",
    "register_preset", "get_preset", "list_presets", "preset_names",
]
