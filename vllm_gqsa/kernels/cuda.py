# SPDX-License-Identifier: Apache-2.0
"""Loads the GQSA CUDA ops and wraps them.

The ops live in the ``vllm_gqsa`` torch library namespace (``csrc/torch_bindings.cpp`` documents
their signatures). They come from a prebuilt ``vllm_gqsa._C`` extension if one is installed, or are
JIT-built from ``csrc/`` with :func:`torch.utils.cpp_extension.load` when a CUDA build of torch,
a GPU and nvcc are present (cached under ``$VLLM_GQSA_CACHE``, default ``~/.cache/vllm_gqsa``).
This module imports cleanly on a CPU-only machine; :func:`available` says why the ops are missing.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import torch

from .cuda_format import MAX_GEMV_TOKENS

# Persistent-grid size of the GEMV. Measured on an H100 (4096x4096, M=1, heavy row block): 2 CTAs
# per SM 6.99 us, 4 per SM 7.52 us, 8 per SM 8.65 us; fewer, longer warp tasks pay the per-task
# prologue and fix-up less often.
CTAS_PER_SM = 2
JIT_NAME = "vllm_gqsa_C"
CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("torch_bindings.cpp", "gqsa_kernels.cu")

_lock = threading.Lock()
_status: tuple[bool, str] | None = None


def _cache_dir() -> Path:
    root = Path(os.environ.get("VLLM_GQSA_CACHE", Path.home() / ".cache" / "vllm_gqsa"))
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}".replace("+", "_")
    return root / "torch_extensions" / tag


def _jit_build() -> tuple[bool, str]:
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build, and no prebuilt vllm_gqsa._C is installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible to torch"
    from torch.utils.cpp_extension import CUDA_HOME, load

    nvcc = Path(CUDA_HOME or "", "bin", "nvcc")
    if not nvcc.exists() and shutil.which("nvcc") is None:
        return False, "nvcc was not found (set CUDA_HOME) to JIT-build the GQSA CUDA ops"
    sources = [CSRC_DIR / s for s in SOURCES]
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        return False, f"the CUDA sources are missing: {', '.join(missing)}"
    build_dir = _cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = ["-O3", "-std=c++17"]
    try:
        load(name=JIT_NAME, sources=[str(s) for s in sources], extra_cflags=flags,
             extra_cuda_cflags=flags + ["--expt-relaxed-constexpr"],
             build_directory=str(build_dir), is_python_module=False, verbose=False)
    except Exception as e:  # a failed build must not break importers: report it instead
        return False, f"JIT build of the GQSA CUDA ops failed: {type(e).__name__}: {e}"
    return True, f"JIT-built into {build_dir}"


def _register_fakes() -> None:
    """Shape-only implementations, for torch.compile and opcheck."""

    @torch.library.register_fake("vllm_gqsa::gqsa_gemv")
    def _gemv_fake(x, row_ptr, codes, meta, schedule, n_out):
        return x.new_empty((x.shape[0], n_out))

    @torch.library.register_fake("vllm_gqsa::gqsa_dequant")
    def _dequant_fake(row_ptr, codes, meta, n_out, k_in, group_size, dtype):
        return row_ptr.new_empty((n_out, k_in), dtype=dtype)


def _load() -> tuple[bool, str]:
    try:
        import vllm_gqsa._C  # noqa: F401  (importing it registers the ops)
        status = (True, "prebuilt vllm_gqsa._C")
    except ImportError:
        status = _jit_build()
    if status[0]:
        _register_fakes()
    return status


def available() -> tuple[bool, str]:
    """Whether the CUDA ops can run here, and how they were loaded or why not. Builds on first call."""
    global _status
    with _lock:
        if _status is None:
            _status = _load()
        return _status


def _require() -> None:
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"GQSA CUDA ops are not available: {reason}")


def default_num_ctas(device: torch.device | int | None = None) -> int:
    """The GEMV grid for a device: CTAS_PER_SM CTAs per SM (pass it to ``to_kernel_format``)."""
    return CTAS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def gemv(x: torch.Tensor, t: dict[str, torch.Tensor], n_out: int) -> torch.Tensor:
    """``x @ W.T`` for x ``[..., K]`` with at most MAX_GEMV_TOKENS rows; t from ``to_kernel_format``."""
    _require()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if x2.shape[0] > MAX_GEMV_TOKENS:
        raise ValueError(f"gemv takes at most {MAX_GEMV_TOKENS} tokens, got {x2.shape[0]}; "
                         f"use dequant() and a GEMM for larger batches")
    y = torch.ops.vllm_gqsa.gqsa_gemv(x2, t["row_ptr"], t["codes"], t["meta"], t["schedule"], n_out)
    return y.reshape(*lead, n_out)


def dequant(t: dict[str, torch.Tensor], n_out: int, k_in: int, group_size: int,
            dtype: torch.dtype) -> torch.Tensor:
    """The dense weight ``[n_out, k_in]`` in ``dtype`` (zeros where pruned)."""
    _require()
    return torch.ops.vllm_gqsa.gqsa_dequant(t["row_ptr"], t["codes"], t["meta"], n_out, k_in,
                                            group_size, dtype)
