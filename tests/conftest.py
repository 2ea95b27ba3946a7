import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(os.environ.get("TOPK_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; set TOPK_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    # OMP_NUM_THREADS, when set, wins: parallel test runs on a small machine each take one thread.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session", params=["cpu", pytest.param("cuda", marks=needs_cuda)])
def device(request) -> torch.device:
    """Each device the op runs on: CPU (the C kernel, or the torch path for other dtypes) and a CUDA GPU where
    there is one (the Triton kernel, or the torch path for other dtypes, long rows or without Triton)."""
    return torch.device(request.param)
