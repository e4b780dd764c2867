# SPDX-License-Identifier: Apache-2.0
"""Loads the GQSA CUDA ops and wraps them.

The ops live in the ``vllm_gqsa`` torch library namespace (``csrc/torch_bindings.cpp`` documents
their signatures). They come from a prebuilt ``vllm_gqsa._C`` extension if one is installed, or are
JIT-built from the CUDA sources with :func:`torch.utils.cpp_extension.load` when a CUDA build of
torch, a GPU and nvcc are present (cached under ``$VLLM_GQSA_CACHE``, default
``~/.cache/vllm_gqsa``). The sources are ``vllm_gqsa/csrc/`` in an installed package (setup.py puts
them there) and the repository's ``csrc/`` in a checkout or an editable install.
This module imports cleanly on a CPU-only machine; :func:`available` says why the ops are missing,
and :func:`log_install` says so once at plugin registration when no prebuilt ops are installed.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from .cuda_format import MAX_GEMV_TOKENS

# Persistent-grid size of the GEMV. Measured on an H200 (benchmarks/results/gpu/
# kernels_llama2-7b_h200_ctas*.json): a Llama-2-7B layer at M=1 took 49.9 us with 2 CTAs per
# SM, 50.8 with 3 and 60.0 with 4; fewer, longer warp tasks pay the per-task prologue, x copy and
# fix-up less often. With two load steps per batch (76 registers, so three CTAs fit an SM) 3 per SM
# is within 1% of 2 (44.4 against 44.5 us, kernels_h200_gemv_load_steps_r2.json); with 2, two
# CTAs fit an SM even with the largest shared x copy (kMaxSharedXBytes, 100 KB), so a wide layer at
# 2 or 3 tokens never runs its grid in two waves.
CTAS_PER_SM = 2
# Batches of up to GEMV_MAX_TOKENS tokens run the GEMV (one launch per MAX_GEMV_TOKENS tokens),
# up to TC_MAX_TOKENS the tensor-core kernel (one launch per 64 tokens), larger ones dequantize +
# cuBLAS. The defaults are the crossovers measured by benchmarks/kernel_speed.py on the H200
# (benchmarks/results/gpu/kernels_h200.json, one decoder layer): at 4 tokens the tensor-core
# kernel beats the GEMV on all three models (91.5 against 95.4 us for Llama-2-7B, 97.6 against
# 109.6 for Llama-3-8B, 109.0 against 114.5 for Qwen2.5-7B; in vLLM, batch 4 of the Llama-2-7B
# shape decoded 1027.7 tokens/s against 987.0 on the GEMV, e2e_llama2-7b_h200-two-chunk*.json),
# at 2 the GEMV wins (61.4 against 90.8); the tensor-core kernel wins at 64 (212.4 us against
# 272.6 for dequantize + cuBLAS, kernels_llama2-7b_h200_tc_splits_r1.json) and loses at 128
# (405.4 against 282.1).
GEMV_MAX_TOKENS = int(os.environ.get("VLLM_GQSA_GEMV_MAX_TOKENS", "3"))
TC_MAX_TOKENS = int(os.environ.get("VLLM_GQSA_TC_MAX_TOKENS", "64"))
# Layers with compact tiles (cuda_format: rows of each 64-row tile keep the same group columns, as
# in a checkpoint converted with --block-rows 64) multiply only their kept columns on the tensor
# cores, which moves the first crossover: the tensor-core kernel wins from 4 tokens (73.2 us against
# 99.0 for the GEMV; 72.3 against 63.2 at 2) and still loses at 128 (352.1 against 281.1;
# kernels_llama2-7b_h200_tc_splits_r64.json).
COMPACT_GEMV_MAX_TOKENS = int(os.environ.get("VLLM_GQSA_COMPACT_GEMV_MAX_TOKENS", "2"))
COMPACT_TC_MAX_TOKENS = int(os.environ.get("VLLM_GQSA_COMPACT_TC_MAX_TOKENS", "64"))
# Layers in the pair pattern (cuda_format.pair_pattern) run the sparse-tensor-core kernel instead
# of the tensor-core kernel between the GEMV and dequantize + cuBLAS (one launch per 64 tokens). It
# beats the GEMV from 2 tokens (50.0 against 54.9 us per Llama-2-7B layer, 61.9 against 64.5
# Qwen2.5-7B; at one token 50.0 against 43.0) and dequantize + cuBLAS up to 128 tokens (at 128, in
# two launches, 249.8 against 279.2 us, 275.6 against 298.5 Llama-3-8B, 309.8 against 321.9
# Qwen2.5-7B; benchmarks/results/gpu/kernels_pairs_h200_row_tiles.json), by more since the sparse
# kernel's own K splits (245.5 / 253.1 / 281.1 us at 128, kernels_pairs_h200_sp_splits.json).
PAIRS_GEMV_MAX_TOKENS = int(os.environ.get("VLLM_GQSA_PAIRS_GEMV_MAX_TOKENS", "1"))
PAIRS_SP_MAX_TOKENS = int(os.environ.get("VLLM_GQSA_PAIRS_SP_MAX_TOKENS", "128"))
# On an sm_90 GPU, layers in the pair pattern with K % 128 == 0 run the fused kernel on Hopper's
# sparse tensor cores (gqsa_sp_wgmma) from PAIRS_WGMMA_MIN_TOKENS tokens, in place of the sparse-
# tensor-core kernel and of dequantize + cuBLAS. One Llama-2-7B layer on the H100: 276.8 / 527.1 /
# 943.8 us at 512 / 1024 / 2048 tokens against 482.4 / 815.2 / 1444.9 for dequantize + cuBLAS
# (cuBLAS fp16 alone 319.6 / 615.4 / 1292.4; kernels_pairs_h100_sp_wgmma.json). With its 64-token
# tiles, K splits in clusters and x padded to whole token tiles it takes 92.6 / 93.4 / 111.6 / 112.6
# / 114.4 us at 48 / 64 / 65 / 96 / 128 tokens against 121.5 / 126.5 / 174.0 / 206.0 / 249.7 for the
# sparse-tensor-core kernel, whose 64-token instance runs from 33 tokens; at 32 that kernel is
# faster, 86.5 against 91.7 (Llama-3-8B the same way: 90.3 against 93.1 at 32, 126.9 against 93.9
# at 48; benchmarks/results/gpu/kernels_pairs_h100_padded_x_ab_padded_r*.json).
# VLLM_GQSA_PAIRS_WGMMA=0 turns it off.
PAIRS_WGMMA = os.environ.get("VLLM_GQSA_PAIRS_WGMMA", "1") != "0"
PAIRS_WGMMA_MIN_TOKENS = int(os.environ.get("VLLM_GQSA_PAIRS_WGMMA_MIN_TOKENS", "33"))
# The kernel layout of the layers that can take either (cuda_format.sliced_layout_applies):
# "auto", the sliced layout, whose one-row-per-lane GEMV made a decoder layer 9-10% faster at one
# token on the Llama-2-7B and Llama-3-8B shapes (1% on Qwen2.5-7B) and 13-21% at two, while its
# tensor-core kernel was 7-13% slower at 64 tokens, on an H100 (benchmarks/results/gpu/
# kernels_h100_sliced_{small,large}.json); or "rows".
LAYOUTS = ("auto", "rows")


def kernel_layout() -> str:
    """The layout asked for with ``VLLM_GQSA_LAYOUT`` (default "auto")."""
    layout = os.environ.get("VLLM_GQSA_LAYOUT", "auto")
    if layout not in LAYOUTS:
        raise ValueError(f"VLLM_GQSA_LAYOUT={layout!r}: expected one of {LAYOUTS}")
    return layout


JIT_NAME = "vllm_gqsa_C"
_PACKAGED_CSRC = Path(__file__).resolve().parents[1] / "csrc"
CSRC_DIR = _PACKAGED_CSRC if _PACKAGED_CSRC.is_dir() else Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("torch_bindings.cpp", "gqsa_kernels.cu")

# Under "vllm." so that vLLM's logging configuration prints it.
logger = logging.getLogger("vllm.gqsa")

_lock = threading.Lock()
_status: tuple[bool, str] | None = None
_install_logged = False


def _cache_dir() -> Path:
    # Path.home() only when needed: it raises for a user with no home (an arbitrary container UID).
    root = Path(os.environ.get("VLLM_GQSA_CACHE") or Path.home() / ".cache" / "vllm_gqsa")
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}".replace("+", "_")
    return root / "torch_extensions" / tag


def _jit_blocker() -> str | None:
    """Why the ops cannot be JIT-built here, as far as can be told without touching a GPU (CUDA
    must not be initialized at plugin registration, before vLLM forks its workers)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build, and no prebuilt vllm_gqsa._C is installed"
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = Path(CUDA_HOME or "", "bin", "nvcc")
    if not nvcc.exists():
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            return "nvcc was not found (set CUDA_HOME) to JIT-build the GQSA CUDA ops"
    nvcc_cuda = _nvcc_release(str(nvcc))
    if nvcc_cuda and nvcc_cuda.split(".")[0] != torch.version.cuda.split(".")[0]:
        return (f"nvcc {nvcc} is CUDA {nvcc_cuda} but torch was built with CUDA {torch.version.cuda}; "
                f"point CUDA_HOME at a CUDA {torch.version.cuda.split('.')[0]} toolkit to JIT-build the GQSA CUDA ops")
    missing = [str(CSRC_DIR / s) for s in SOURCES if not (CSRC_DIR / s).exists()]
    if missing:
        return f"the CUDA sources are missing: {', '.join(missing)}"
    return None


@functools.lru_cache(maxsize=None)
def _nvcc_release(nvcc: str) -> str | None:
    """The CUDA release nvcc says it is ("13.0"), or None if it does not say."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def _jit_build() -> tuple[bool, str]:
    blocker = _jit_blocker()
    if blocker is not None:
        return False, blocker
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible to torch"
    from torch.utils.cpp_extension import load

    sources = [CSRC_DIR / s for s in SOURCES]
    flags = ["-O3", "-std=c++17"]
    try:
        build_dir = _cache_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        # One build at a time (vLLM starts a process per GPU), under an OS lock that dies with its
        # holder. torch's own `lock` file, which its builds wait on for as long as it exists, is
        # left behind by a build that was killed: whoever holds the OS lock knows no build is
        # running, so such a file is stale.
        with open(build_dir / "build.flock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            stale = build_dir / "lock"
            if stale.exists():
                logger.warning("removing %s, left by an interrupted JIT build of the GQSA CUDA ops", stale)
                stale.unlink(missing_ok=True)
            load(name=JIT_NAME, sources=[str(s) for s in sources], extra_cflags=flags,
                 extra_cuda_cflags=flags + ["--expt-relaxed-constexpr"],
                 build_directory=str(build_dir), is_python_module=False, verbose=False)
    except Exception as e:  # a failed build must not break importers: report it instead
        return False, f"JIT build of the GQSA CUDA ops failed: {type(e).__name__}: {e}"
    return True, f"JIT-built into {build_dir}"


def _register_fakes() -> None:
    """Shape-only implementations, for torch.compile and opcheck."""

    @torch.library.register_fake("vllm_gqsa::gqsa_gemv")
    def _gemv_fake(x, row_ptr, codes, meta, schedule, n_out, x_staging=-1):
        return x.new_empty((x.shape[0], n_out))

    @torch.library.register_fake("vllm_gqsa::gqsa_sliced_gemv")
    def _sliced_gemv_fake(x, sell_rows, pieces, codes, meta, counters, n_out, warps=()):
        return x.new_empty((x.shape[0], n_out))

    @torch.library.register_fake("vllm_gqsa::gqsa_sliced_gemv_add_stats")
    def _add_stats_fake(x, residual, weight, sell_rows, pieces, codes, meta, counters, n_out, warps=()):
        return (torch.empty_like(residual), x.new_empty((x.shape[0], n_out)),
                x.new_empty((x.shape[0], pieces.shape[0]), dtype=torch.float32))

    @torch.library.register_fake("vllm_gqsa::gqsa_sliced_gemv_from_stats")
    def _from_stats_fake(g, stats, eps, residual, weight, sell_rows, pieces, codes, meta, counters, n_out, warps=()):
        return g.new_empty((g.shape[0], n_out))

    @torch.library.register_fake("vllm_gqsa::gqsa_tc")
    def _tc_fake(x, row_ptr, codes, meta, chunks, n_out, splits=0, xcols=None, counters=None, sell_rows=None):
        return x.new_empty((x.shape[0], n_out))

    @torch.library.register_fake("vllm_gqsa::gqsa_sp")
    def _sp_fake(x, row_ptr, codes, meta, n_out, splits=0, counters=None, silu_mul=False):
        return x.new_empty((x.shape[0], n_out // 2 if silu_mul else n_out))

    @torch.library.register_fake("vllm_gqsa::gqsa_sp_add_stats")
    def _sp_add_stats_fake(x, residual, weight, row_ptr, codes, meta, n_out, splits=0, counters=None):
        return (torch.empty_like(residual), x.new_empty((x.shape[0], n_out)),
                x.new_empty((x.shape[0], (n_out + 31) // 32), dtype=torch.float32))

    @torch.library.register_fake("vllm_gqsa::gqsa_sp_from_stats")
    def _sp_from_stats_fake(g, stats, eps, residual, weight, row_ptr, codes, meta, n_out, splits=0, counters=None,
                            silu_mul=False):
        return g.new_empty((g.shape[0], n_out // 2 if silu_mul else n_out))

    @torch.library.register_fake("vllm_gqsa::gqsa_sp_wgmma")
    def _sp_wgmma_fake(x, row_ptr, codes, meta, n_out, splits=0):
        return x.new_empty((x.shape[0], n_out))

    @torch.library.register_fake("vllm_gqsa::gqsa_dequant")
    def _dequant_fake(row_ptr, codes, meta, n_out, k_in, group_size, dtype, sell_rows=None):
        return row_ptr.new_empty((n_out, k_in), dtype=dtype)


def _runs_here() -> str | None:
    """Why the loaded ops cannot run on this GPU, or None: one tiny launch, which fails where the
    build holds no code for the GPU (e.g. a prebuilt _C for sm_80 and sm_90a on a newer GPU
    without PTX to fall back on)."""
    if not torch.cuda.is_available() or torch.cuda.is_current_stream_capturing():
        return None  # nothing to launch on (the ops refuse CPU tensors anyway), or not now
    try:  # a launch without code for the GPU fails at once (the launchers check every launch)
        z = torch.zeros(2, dtype=torch.int32, device="cuda")
        torch.ops.vllm_gqsa.gqsa_dequant(z, z.new_zeros((0, 2)), z.new_zeros(0), 1, 16, 16, torch.float16)
    except RuntimeError as e:
        major, minor = torch.cuda.get_device_capability()
        return (f"the GQSA CUDA ops do not run on this GPU (sm_{major}{minor}): {e}; rebuild them for it, "
                f"e.g. TORCH_CUDA_ARCH_LIST={major}.{minor} pip install --no-build-isolation vllm-gqsa")
    return None


def _load() -> tuple[bool, str]:
    try:
        import vllm_gqsa._C  # noqa: F401  (importing it registers the ops)
        status = (True, "prebuilt vllm_gqsa._C")
    except ImportError as e:
        status = _jit_build()
        if not status[0] and importlib.util.find_spec("vllm_gqsa._C") is not None:
            # Installed but unloadable: typically built against another torch.
            status = (False, f"the prebuilt vllm_gqsa._C does not load ({e}), and {status[1]}")
    if status[0]:
        reason = _runs_here()
        if reason is not None:
            return False, reason
        _register_fakes()
    return status


def log_install() -> None:
    """One log line per process, at plugin registration, when no prebuilt vllm_gqsa._C is installed
    (a package built without CUDA): whether the ops will be JIT-built at first use or why GQSA
    layers will run through the torch fallback. Builds and loads nothing; with a prebuilt ``_C`` it
    is silent, and each layer's log line names the kernel that serves it."""
    global _install_logged
    if _install_logged:
        return
    _install_logged = True
    if importlib.util.find_spec("vllm_gqsa._C") is not None:
        return
    blocker = _jit_blocker()
    if blocker is None:
        logger.info("GQSA CUDA kernels: no prebuilt vllm_gqsa._C is installed; they will be "
                    "JIT-built from %s at first use on a GPU", CSRC_DIR)
    else:
        logger.warning("GQSA CUDA kernels are not available (%s): GQSA layers run through the torch "
                       "fallback, correct but not fast", blocker)


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


def dispatch(compact: bool, pairs: bool = False) -> tuple[int, int]:
    """The most tokens the GEMV, then the tensor-core kernel (the sparse-tensor-core kernel for a
    layer in the pair pattern), serve for a layer (with compact tiles or not); dequantize + cuBLAS
    serves larger batches. (On sm_90 the fused kernel serves pair layers from
    PAIRS_WGMMA_MIN_TOKENS tokens: :func:`sp_wgmma_takes`.)"""
    if pairs:
        return PAIRS_GEMV_MAX_TOKENS, PAIRS_SP_MAX_TOKENS
    if compact:
        return COMPACT_GEMV_MAX_TOKENS, COMPACT_TC_MAX_TOKENS
    return GEMV_MAX_TOKENS, TC_MAX_TOKENS


def default_num_ctas(device: torch.device | int | None = None) -> int:
    """The GEMV grid for a device: CTAS_PER_SM CTAs per SM (pass it to ``to_kernel_format``)."""
    return CTAS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def gemv(x: torch.Tensor, t: dict[str, torch.Tensor], n_out: int, x_staging: int = -1,
         warps: list[int] | None = None) -> torch.Tensor:
    """``x @ W.T`` for x ``[..., K]``; t from ``to_kernel_format``. One kernel launch per
    MAX_GEMV_TOKENS tokens (in the sliced layout 3, or fewer where x would not fit the shared
    memory), each reading the weights once, so it suits
    decode-sized batches. In the sliced layout it runs the sliced GEMV with the warps per CTA of
    ``warps`` (for 1, 2, 3 tokens), else of ``t["sell_warps"]``, else 8.

    ``x_staging`` picks where the row layout's GEMV reads x: -1 lets it choose (shared memory when
    x fits), 0 global memory, 1 shared memory; the explicit choices are for tests and benchmarks.
    The sliced GEMV always stages x in shared memory."""
    _require()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if "sell_rows" in t:
        if x_staging not in (-1, 1):
            raise ValueError("the sliced layout's GEMV reads x from shared memory only (x_staging -1 or 1)")
        if warps is None:
            warps = t["sell_warps"].tolist() if "sell_warps" in t else []
        y = torch.ops.vllm_gqsa.gqsa_sliced_gemv(x2, t["sell_rows"], t["schedule"], t["codes"], t["meta"],
                                                 t["slice_parts"], n_out, warps)
    else:
        y = torch.ops.vllm_gqsa.gqsa_gemv(x2, t["row_ptr"], t["codes"], t["meta"], t["schedule"], n_out,
                                          x_staging)
    return y.reshape(*lead, n_out)


def tc(x: torch.Tensor, t: dict[str, torch.Tensor], n_out: int, splits: int = 0) -> torch.Tensor:
    """``x @ W.T`` for x ``[..., K]`` on tensor cores; t from ``to_kernel_format``. For batches
    between the GEMV's and cuBLAS's. ``splits`` (CTAs per row tile along K) 0 lets the op choose.
    A layer with compact tiles (``t["xcols"]``) multiplies only its tiles' kept columns."""
    _require()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.vllm_gqsa.gqsa_tc(x2, t["row_ptr"], t["codes"], t["meta"], t["chunks"], n_out, splits,
                                    t.get("xcols"), t.get("counters"), t.get("sell_rows"))
    return y.reshape(*lead, n_out)


def sp(x: torch.Tensor, t: dict[str, torch.Tensor], n_out: int, splits: int = 0,
       silu_mul: bool = False) -> torch.Tensor:
    """``x @ W.T`` for x ``[..., K]`` on sparse tensor cores, for a layer in the pair pattern
    (``cuda_format.pair_pattern``); t from ``to_kernel_format``. As :func:`tc` otherwise.
    silu_mul: W is a gate/up layer (gate's ``n_out / 2`` rows, then up's), and the result is
    vLLM's SiLU-and-mul of ``x @ W.T`` (``reference.silu_and_mul``), ``[..., n_out / 2]``."""
    _require()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.vllm_gqsa.gqsa_sp(x2, t["row_ptr"], t["codes"], t["meta"], n_out, splits, t.get("counters"),
                                    silu_mul)
    return y.reshape(*lead, y.shape[-1])


def sp_wgmma_runs(x: torch.Tensor, t: dict[str, torch.Tensor] | None = None) -> bool:
    """Whether :func:`sp_wgmma` can serve x ``[..., K]`` (a layer in the pair pattern assumed): an
    sm_90 GPU, K % 128 == 0, fp16 or bf16, x (and t's codes and meta, if given) 16-byte aligned,
    as its TMA copies need, and x's permuted copy, padded by up to 127 tokens to whole token tiles,
    under 2^31 elements (the kernel's int32 offsets; larger batches take dequantize + cuBLAS)."""
    aligned = [x] + ([t["codes"], t["meta"]] if t is not None else [])
    K = x.shape[-1]
    return (x.is_cuda and K > 0 and K % 128 == 0 and x.dtype in (torch.float16, torch.bfloat16)
            and (x.shape[:-1].numel() + 127) * K < 2**31
            and all(a.data_ptr() % 16 == 0 for a in aligned) and torch.cuda.get_device_capability(x.device) == (9, 0))


def sp_wgmma_takes(x: torch.Tensor, t: dict[str, torch.Tensor] | None = None) -> bool:
    """Whether the plugin serves x with :func:`sp_wgmma` for a layer in the pair pattern: it can
    (:func:`sp_wgmma_runs`), ``VLLM_GQSA_PAIRS_WGMMA`` is not 0, and x has at least
    ``PAIRS_WGMMA_MIN_TOKENS`` tokens; anything else takes another kernel."""
    return PAIRS_WGMMA and x.shape[:-1].numel() >= PAIRS_WGMMA_MIN_TOKENS and sp_wgmma_runs(x, t)


def sp_wgmma(x: torch.Tensor, t: dict[str, torch.Tensor], n_out: int, splits: int = 0) -> torch.Tensor:
    """``x @ W.T`` for x ``[..., K]`` and a layer in the pair pattern on Hopper's sparse tensor
    cores, fused (no dense copy of W); where :func:`sp_wgmma_takes`. splits: how many CTAs of one
    cluster share each tile's K (0 chooses, enough to fill the GPU where the grid is small)."""
    _require()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.vllm_gqsa.gqsa_sp_wgmma(x2, t["row_ptr"], t["codes"], t["meta"], n_out, splits)
    return y.reshape(*lead, n_out)


def dequant(t: dict[str, torch.Tensor], n_out: int, k_in: int, group_size: int,
            dtype: torch.dtype) -> torch.Tensor:
    """The dense weight ``[n_out, k_in]`` in ``dtype`` (zeros where pruned)."""
    _require()
    return torch.ops.vllm_gqsa.gqsa_dequant(t["row_ptr"], t["codes"], t["meta"], n_out, k_in,
                                            group_size, dtype, t.get("sell_rows"))
