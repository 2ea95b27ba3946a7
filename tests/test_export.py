"""Deploying sparsified models: torch.compile, torch.export, ONNX (both exporters, run by onnxruntime), jit.

Kept few and small for CI on CPU: 64 px inputs, one export per exporter covering every mode and tie rule.
"""
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torchvision
from torch import nn

from topk_plugin import TopK, sparsify, topk_layers, topk_mask
from topk_plugin import onnx_translation_table
from topk_plugin.ops import MODES, TIES, topk_and_mask

from conftest import needs_cuda


def small_alexnet() -> nn.Module:
    """Torchvision's AlexNet with a small head (the Top-K layers sit in ``features``): a small ONNX file, and a
    pooling that ONNX supports for the 1x1 maps of a 64 px input."""
    model = torchvision.models.alexnet(num_classes=10)
    model.avgpool, model.classifier = nn.AdaptiveAvgPool2d(1), nn.Linear(256, 10)
    return model


class EveryMode(nn.Module):
    """Every mode and tie rule of spatial Top-K, token Top-K with a CLS token and on an (N, H, W, D) map, the
    mask op and the differentiable op with its mask: one graph for one export."""

    def __init__(self):
        super().__init__()
        self.spatial = nn.ModuleList(TopK(0.2, mode=m, ties=t) for m in MODES for t in TIES)
        self.tokens = nn.ModuleList(TopK(0.3, mode=m, kind="token", ties=t, num_prefix_tokens=1)
                                    for m in MODES for t in TIES)
        self.token_map = TopK(0.25, kind="token")

    def forward(self, maps, tokens):
        outputs = [layer(maps) for layer in self.spatial] + [layer(tokens) for layer in self.tokens]
        values, mask = topk_and_mask(maps, 0.1, mode="non_topk", ties="all")
        return (*outputs, self.token_map(maps.permute(0, 2, 3, 1)), topk_mask(maps, 0.1), values, mask)


def special_values(*shape) -> torch.Tensor:
    """Small integers (many ties and zeros) with NaN, ±inf and -0.0 sprinkled in."""
    x = torch.randint(-3, 4, shape).float()
    flat = x.view(-1)
    index = torch.randperm(flat.numel())[:8]
    flat[index] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0] * 2)
    return x


def onnx_bytes(model: nn.Module, args: tuple, dynamo: bool) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        if dynamo:
            program = torch.onnx.export(model, args, dynamo=True, verbose=False,
                                        custom_translation_table=onnx_translation_table())
            return program.model_proto.SerializeToString()
        import io

        buffer = io.BytesIO()
        torch.onnx.export(model, args, buffer, dynamo=False)
        return buffer.getvalue()


def run_onnx(data: bytes, *inputs: torch.Tensor) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})


def test_onnx_export_of_a_sparsified_alexnet_reads_its_input():
    """Issue 10 item 1: the ctypes kernel was invisible to the tracer, so the graph had no input at all."""
    torch.manual_seed(0)
    model = sparsify(small_alexnet(), "paper").eval()
    assert len(topk_layers(model)) == 5
    data = onnx_bytes(model, (torch.randn(1, 3, 64, 64),), dynamo=False)
    graph = onnx.load_from_string(data).graph
    initializers = {t.name for t in graph.initializer}
    assert [i.name for i in graph.input if i.name not in initializers], "the exported graph reads an input"
    first, second = torch.randn(2, 1, 3, 64, 64)
    out_first, out_second = run_onnx(data, first)[0], run_onnx(data, second)[0]
    assert not np.allclose(out_first, out_second), "the output changes with the input"
    with torch.no_grad():
        np.testing.assert_allclose(out_first, model(first).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out_second, model(second).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_equals_pytorch_for_every_mode_and_tie_rule(dynamo):
    torch.manual_seed(0)
    model = EveryMode().eval()
    data = onnx_bytes(model, (special_values(2, 3, 6, 7), special_values(2, 9, 5)), dynamo)
    maps, tokens = special_values(2, 3, 6, 7), special_values(2, 9, 5)  # new values: the graph must read them
    expected = model(maps, tokens)
    actual = run_onnx(data, maps, tokens)
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        np.testing.assert_array_equal(got, want.numpy())  # exact: same mask, NaN where PyTorch has NaN


def test_onnx_export_refuses_a_dtype_without_an_exact_key():
    model = nn.Sequential(TopK(0.5)).double()
    with pytest.raises(Exception, match="cast the model, e.g. to float32"):
        onnx_bytes(model, (torch.randn(1, 2, 3, 3, dtype=torch.float64),), dynamo=False)


@pytest.mark.parametrize("name", ["alexnet", "resnet50"])
def test_sparsified_model_compiles_as_one_graph(name):
    model = sparsify(getattr(torchvision.models, name)(num_classes=10), "paper").eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: a graph break is an error
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_compiled_layer_matches_eager_with_its_gradient(device):
    layer = nn.Sequential(nn.Conv2d(3, 4, 3), TopK(0.1, mode="non_topk")).to(device)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 3, 11, 11, device=device, requires_grad=True)
    out = compiled(x)
    torch.testing.assert_close(out, layer(x))
    (grad,) = torch.autograd.grad(out.sum(), x)
    (expected,) = torch.autograd.grad(layer(x).sum(), x)
    torch.testing.assert_close(grad, expected)


@needs_cuda
@pytest.mark.parametrize("name, dtype", [("alexnet", torch.float32), ("alexnet", torch.float64),
                                         ("resnet50", torch.float64)])
def test_reduce_overhead_compile_replays_cuda_graphs_of_a_sparsified_model(name, dtype):
    """Inductor with CUDA graphs ("reduce-overhead") over a sparsified model, through the Triton kernel (float32)
    and the torch path (float64): one graph, its replays equal eager on each new input (an op that synchronised
    with the host could not be captured). float64 for ResNet-50: fused and unfused batch norms then round alike
    far below the gaps between ranked values."""
    model = sparsify(getattr(torchvision.models, name)(num_classes=10), "paper").eval().cuda().to(dtype)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(3):  # the first calls record, later ones replay
            x = torch.randn(2, 3, 64, 64, device="cuda", dtype=dtype)
            torch.testing.assert_close(compiled(x), model(x))


def test_torch_export_saves_and_loads_a_sparsified_model(tmp_path, device):
    model = sparsify(small_alexnet(), "paper").eval().to(device)
    program = torch.export.export(model, (torch.randn(1, 3, 64, 64, device=device),))
    targets = {str(node.target) for node in program.graph.nodes}
    assert any(t.startswith("topk_plugin.") for t in targets), targets
    torch.export.save(program, tmp_path / "alexnet.pt2")
    loaded = torch.export.load(tmp_path / "alexnet.pt2").module()
    x = torch.randn(1, 3, 64, 64, device=device)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_jit_trace_saves_and_loads(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), TopK(0.1), nn.Conv2d(8, 4, 1), TopK(0.2, mode="non_topk")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
        torch.jit.trace(model, torch.randn(1, 3, 12, 12)).save(str(tmp_path / "model.pt"))
        loaded = torch.jit.load(str(tmp_path / "model.pt"))
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
