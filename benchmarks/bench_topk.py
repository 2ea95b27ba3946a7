"""Top-K speed: this library's op and sparsified models against the paper's layer and a copy, in one run.

    python benchmarks/bench_topk.py --out runs/bench_topk              # every case, CPU, 2 threads
    python benchmarks/bench_topk.py --device cuda --out runs/bench_gpu # the same table on a GPU
    python benchmarks/bench_topk.py --cases models --models vgg16 --batch 8 --out runs/bench_vgg

Baseline: a re-implementation of the paper's layer — ``|x|.topk`` indices, a float mask built with
``scatter``, a multiply, and a count of the zeros of the output (``torch.where(y == 0)``) on every call.
``clone`` copies the same tensor: one read and one write, the floor of any layer that writes a new
tensor, so ``ours/clone`` says how far the op is from memory speed. Each case reports the best of
``--repeats`` timings taken in turn (baseline, ours, clone, ...), so every ratio compares runs of one
moment; ``_paired`` columns are medians of the ratios within each round instead, steadier on a shared
machine; before timing, each op case checks that the baseline and ours compute the same output. Inputs are
random tensors and randomly initialised torchvision models (no data is read). By default glibc keeps freed
memory (``--allocator steady``, see ``keep_freed_memory``), so no timing includes page faults.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision
from tqdm import tqdm

from topk_plugin import Table, _select, _triton, get_preset, sparsify, topk, topk_layers
from topk_plugin.recipes._common import (positive_int, prepare_out, pyplot, resolve_device, save_figure,
                                         seed_everything, write_csv, write_json)

OP_SHAPES = [(32, 64, 55, 55), (32, 256, 13, 13), (32, 128, 56, 56)]
OP_KS = [0.05, 0.1, 0.2]
TOKEN_SHAPE, TOKEN_K = (64, 197, 768), 0.6
MODELS = ("alexnet", "vgg16", "resnet50")
CASES = ("op", "backward", "token", "models")


# ----------------------------------------------------------------------------- the paper's layer

def paper_topk(x: torch.Tensor, k: float, dim_positions=(2, 3)) -> torch.Tensor:
    """The authors' layer: float mask from topk + scatter, multiply, then count zeros (a sync and a pass)."""
    if dim_positions == (2, 3):
        flat = x.flatten(2)
        dim = -1
    else:  # tokens (N, T, D): rank along T
        flat, dim = x, 1
    count = max(1, int(k * flat.shape[dim]))
    index = flat.abs().topk(count, dim=dim).indices
    mask = torch.zeros_like(flat).scatter_(dim, index, 1.0)
    y = (flat * mask).reshape(x.shape)
    y.zero_count = torch.where(y == 0)[0].numel()  # the paper logs the sparsity on every call
    return y


class PaperTopK(torch.nn.Module):
    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, x):
        return paper_topk(x, self.k)


def with_paper_layers(model: torch.nn.Module, positions: list[str], k: float) -> torch.nn.Module:
    """``model`` with the paper's layer applied to the output of each module named in ``positions``."""
    modules = dict(model.named_modules())
    for name in positions:
        layer = PaperTopK(k)
        modules[name].register_forward_hook(lambda module, args, output, layer=layer: layer(output))
    return model


# ----------------------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def keep_freed_memory() -> bool:
    """Ask glibc to serve every allocation from its heap and never hand freed memory back (no ``mmap`` per
    large block, no trimming), so a timing measures the work, not the page faults of a fresh buffer: those
    made a 50 MB ``clone`` cost 5 to 30 ms at random on the reference machine. False where the C library
    has no ``mallopt`` (not glibc); the timings then include whatever the allocator does."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def race(fns: dict, device: torch.device, repeats: int) -> dict:
    """Best wall time (ms) of each function over ``repeats`` rounds that run them in turn, each round starting
    one function later (no function always follows the same one); on CPU also the best process CPU time
    (key ``name + "_cpu"``), which other processes on a busy machine disturb less. Key ``"rounds"``: every
    round's wall times, for ratios paired within a round (``paired_ratio``)."""
    for fn in fns.values():
        fn()
    names = list(fns)
    best = {f"{name}{clock}": float("inf") for name in fns for clock in ("", "_cpu")}
    rounds = []
    for r in range(repeats):
        times = {}
        for name in names[r % len(names):] + names[:r % len(names)]:
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            synchronize(device)
            times[name] = (time.perf_counter() - start) * 1e3
            best[name] = min(best[name], times[name])
            best[name + "_cpu"] = min(best[name + "_cpu"], (time.process_time() - start_cpu) * 1e3)
        rounds.append(times)
    return {**best, "rounds": rounds}


def paired_ratio(ms: dict, name: str, reference: str) -> float:
    """Median over rounds of ``name``'s time over ``reference``'s in the same round: slow drifts of a shared
    machine move both timings of a round together, so this is steadier than a ratio of bests."""
    return statistics.median(t[name] / t[reference] for t in ms["rounds"])


def saved_bytes_per_element(fn, x: torch.Tensor) -> float:
    """Bytes autograd keeps for backward beyond the input itself, per input element."""
    storages = {}
    inputs = {x.untyped_storage().data_ptr()}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in inputs:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(storages.values()) / x.numel()


# ----------------------------------------------------------------------------- cases

def same_output(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Refuse to time two things that do not compute the same result."""
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        raise AssertionError(f"{what}: the baseline and ours differ; the timing would compare different work")


def op_rows(shapes, ks, device, repeats, backward: bool) -> list[dict]:
    rows = []
    for shape in tqdm(shapes, desc="op fwd+bwd" if backward else "op forward"):
        x = torch.randn(shape, device=device).relu_()  # the layer sits after a ReLU in every preset
        for k in ks:
            same_output(paper_topk(x, k), topk(x, k), f"op {shape} k={k}")
            if backward:
                leaf = x.clone().requires_grad_()
                grad = torch.randn_like(x)
                fns = {name: lambda op=op: torch.autograd.grad(op(leaf), leaf, grad)
                       for name, op in (("baseline", lambda t: paper_topk(t, k)), ("ours", lambda t: topk(t, k)),
                                        ("clone", torch.clone))}
            else:
                fns = {"baseline": lambda: paper_topk(x, k), "ours": lambda: topk(x, k), "clone": x.clone}
            ms = race(fns, device, repeats)
            row = {"case": "op fwd+bwd" if backward else "op forward", "shape": "x".join(map(str, shape)),
                   "k": k, **_ratios(ms)}
            if backward:
                row["baseline_saved_B/elem"] = saved_bytes_per_element(lambda t: paper_topk(t, k), x.clone().requires_grad_())
                row["ours_saved_B/elem"] = saved_bytes_per_element(lambda t: topk(t, k), x.clone().requires_grad_())
            rows.append(row)
    return rows


def token_rows(shape, k, device, repeats) -> list[dict]:
    x = torch.randn(shape, device=device)
    same_output(paper_topk(x[:, 1:], k, dim_positions=(1,)), topk(x, k, kind="token", num_prefix_tokens=1)[:, 1:],
                f"tokens {shape}")
    fns = {"baseline": lambda: paper_topk(x[:, 1:], k, dim_positions=(1,)),
           "ours": lambda: topk(x, k, kind="token", num_prefix_tokens=1), "clone": x.clone}
    return [{"case": "token forward", "shape": "x".join(map(str, shape)), "k": k, **_ratios(race(fns, device, repeats))}]


def model_rows(names, batch, device, repeats) -> list[dict]:
    rows = []
    for name in tqdm(names, desc="models"):
        dense = getattr(torchvision.models, name)(weights=None).eval().to(device)
        spec = get_preset("paper", dense).spec
        ours = sparsify(copy.deepcopy(dense), "paper").eval()
        baseline = with_paper_layers(copy.deepcopy(dense), list(spec.positions), spec.k).eval()
        x = torch.randn(batch, 3, 224, 224, device=device)
        with torch.no_grad():  # not compared: max-pooled maps repeat values, and torch.topk breaks ties arbitrarily
            ms = race({"dense": lambda: dense(x), "baseline": lambda: baseline(x), "ours": lambda: ours(x)},
                      device, repeats)
        rows.append({"case": "model forward", "shape": f"{name} {batch}x3x224x224", "k": spec.k,
                     "dense_ms": ms["dense"], "baseline_ms": ms["baseline"], "ours_ms": ms["ours"],
                     "baseline/ours": ms["baseline"] / ms["ours"],
                     "baseline_overhead_%": 100 * (ms["baseline"] / ms["dense"] - 1),
                     "ours_overhead_%": 100 * (ms["ours"] / ms["dense"] - 1),
                     "baseline_overhead_paired_%": 100 * (paired_ratio(ms, "baseline", "dense") - 1),
                     "ours_overhead_paired_%": 100 * (paired_ratio(ms, "ours", "dense") - 1)})
        if device.type == "cpu":
            rows[-1].update({"baseline_overhead_cpu_%": 100 * (ms["baseline_cpu"] / ms["dense_cpu"] - 1),
                             "ours_overhead_cpu_%": 100 * (ms["ours_cpu"] / ms["dense_cpu"] - 1)})
        # The layers alone, on the activations they see in the model: a small difference of two large,
        # noisy model timings is not needed to know what they cost.
        inputs = layer_inputs(ours, x)
        layers = race({"baseline": lambda: [paper_topk(a, spec.k) for a in inputs],
                       "ours": lambda: [topk(a, spec.k) for a in inputs],
                       "clone": lambda: [a.clone() for a in inputs]}, device, repeats)
        in_model = layer_time_in_model(ours, x, device, repeats)
        rows[-1].update({"baseline_layers_ms": layers["baseline"], "ours_layers_ms": layers["ours"],
                         "ours_layers/clone": layers["ours"] / layers["clone"],
                         "ours_layers_%_of_dense": 100 * layers["ours"] / ms["dense"],
                         "ours_layers_in_model_ms": in_model,
                         "ours_layers_in_model_%_of_dense": 100 * in_model / ms["dense"]})
    return rows


def layer_time_in_model(model: torch.nn.Module, x: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Median over ``repeats`` forwards of the wall time (ms) that the Top-K layers of a sparsified ``model`` take
    inside its forward, where they find the caches as the model's other layers leave them: at batch 1 on a CPU
    a call costs there several times what the same call costs repeated alone (the model's weights evict the
    op's code and data between calls). Each layer is timed from its forward pre-hook to its forward hook."""
    spent, started = [0.0], [0.0]

    def start(module, args):
        synchronize(device)
        started[0] = time.perf_counter()

    def stop(module, args, output):
        synchronize(device)
        spent[0] += time.perf_counter() - started[0]

    layers = topk_layers(model).values()
    handles = [hook for layer in layers
               for hook in (layer.register_forward_pre_hook(start), layer.register_forward_hook(stop))]
    per_forward = []
    try:
        with torch.no_grad():
            for _ in range(repeats + 1):  # the first forward warms up
                spent[0] = 0.0
                model(x)
                per_forward.append(spent[0] * 1e3)
    finally:
        for handle in handles:
            handle.remove()
    return statistics.median(per_forward[1:])


def layer_inputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The tensor each Top-K layer of a sparsified ``model`` receives for input ``x``."""
    seen = []
    handles = [layer.register_forward_hook(lambda module, args, output: seen.append(args[0]))
               for layer in topk_layers(model).values()]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen


def kernel_name(device: torch.device) -> str:
    """Which kernel the op runs for float32 maps on ``device``: the C kernel, the Triton kernel or the torch path."""
    probe = torch.empty(1, 1, 2, 2, device=device)
    return "C" if _select.supports(probe) else "triton" if _triton.supports(probe, "spatial", 0) else "torch path"


def _ratios(ms: dict) -> dict:
    return {"baseline_ms": ms["baseline"], "ours_ms": ms["ours"], "clone_ms": ms["clone"],
            "baseline/ours": ms["baseline"] / ms["ours"], "ours/clone": ms["ours"] / ms["clone"],
            "ours/clone_paired": paired_ratio(ms, "ours", "clone")}


# ----------------------------------------------------------------------------- output

def plot(rows: list[dict], stem: Path) -> list[Path]:
    plt = pyplot()
    labels = [f"{r['case']}\n{r['shape']} k={r['k']}" for r in rows]
    speedup = [r["baseline/ours"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    ax.barh(range(len(rows)), speedup, color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlim(0, 1.15 * max(speedup))  # room for the value labels
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over the paper's layer (baseline ms / ours ms)")
    for i, s in enumerate(speedup):
        ax.text(s, i, f" {s:.1f}x", va="center", fontsize=6)
    fig.tight_layout()
    return save_figure(fig, stem)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_topk"),
                        help="folder for the table (CSV, JSON) and plot; must be new or empty (see --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the earlier benchmark run in --out")
    parser.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:1', or 'auto'")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the inputs and models")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one model, 2 repeats: a run of seconds")
    parser.add_argument("--allocator", choices=("steady", "system"), default="steady",
                        help="steady: glibc keeps freed memory, so timings exclude page faults of fresh buffers "
                             "(see keep_freed_memory); system: the allocator as the process started")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (the kernel uses as many)")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed rounds per case (best-of and the median of per-round ratios are reported)")
    parser.add_argument("--batch", type=positive_int, default=32, help="batch size of the whole-model cases")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="whole-model cases")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, help="which tables to run")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    out = prepare_out(args.out, overwrite=args.overwrite)
    seed_everything(args.seed)
    torch.set_num_threads(args.threads)
    steady = args.allocator == "steady" and keep_freed_memory()
    shapes, ks, token_shape, models = OP_SHAPES, OP_KS, TOKEN_SHAPE, args.models
    batch, repeats = args.batch, args.repeats
    if args.smoke:
        shapes, ks, token_shape, models = [(2, 16, 55, 55), (2, 32, 13, 13)], [0.1], (2, 197, 96), ["alexnet"]
        batch, repeats = 1, 2

    rows = []
    if "op" in args.cases:
        rows += op_rows(shapes, ks, device, repeats, backward=False)
    if "backward" in args.cases:
        rows += op_rows(shapes, ks, device, repeats, backward=True)
    if "token" in args.cases:
        rows += token_rows(token_shape, TOKEN_K, device, repeats)
    if "models" in args.cases:
        rows += model_rows(models, batch, device, repeats)

    machine = {"device": str(device), "threads": args.threads, "cpu": platform.processor() or platform.machine(),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "torch": torch.__version__, "kernel": kernel_name(device),
               "repeats": repeats, "batch": batch, "smoke": args.smoke, "steady_allocator": steady,
               "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    print(f"\n{machine}")
    print(Table(rows))
    write_csv(out / "bench_topk.csv", rows)
    write_json(out / "bench_topk.json", {"machine": machine, "rows": rows})
    plot(rows, out / "bench_topk")
    return rows


if __name__ == "__main__":
    main()
