"""topk-plugin: spatial / token Top-K activation sparsity for any PyTorch model.

Reproduces "Emergence of Shape Bias in Convolutional Neural Networks through Activation
Sparsity" (Li, Wen, Li, Lee, NeurIPS 2023) as reusable model surgery.
"""
from ._onnx import onnx_translation_table
from ._fx import SparsifiedGraphModule, register_notrace_function, register_notrace_module
from .checkpoints import CheckpointError, load_checkpoint, read_checkpoint, unwrap_state_dict
from .layers import TopK
from .models import create_model
from .ops import keep_count, topk, topk_mask
from .parse import parse_spec
from .placement import find_stages, stage_ends
from .presets import Preset, get_preset, list_presets, preset_names, register_preset, unregister_preset
from .report import list_positions, sparsity_report
from .selectors import resolve_targets
from .spec import TopKSpec
from .surgery import desparsify, is_sparsified, select_layers, set_k, sparsify, topk_layers
from .table import Table

__version__ = "0.1.0"

__all__ = [
    "TopK", "TopKSpec", "Preset", "SparsifiedGraphModule", "Table",
    "sparsify", "desparsify", "set_k", "select_layers", "list_positions", "sparsity_report", "topk_layers",
    "is_sparsified", "parse_spec", "resolve_targets", "stage_ends", "find_stages",
    "register_notrace_module", "register_notrace_function",
    "topk", "topk_mask", "keep_count", "onnx_translation_table",
    "register_preset", "unregister_preset", "get_preset", "list_presets", "preset_names",
    "create_model", "read_checkpoint", "unwrap_state_dict", "load_checkpoint", "CheckpointError",
]
