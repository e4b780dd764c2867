# SPDX-License-Identifier: Apache-2.0
"""Builds the CUDA kernels into ``vllm_gqsa._C`` when a CUDA build of torch and nvcc are present
(``pip install --no-build-isolation .``, so the build sees the torch vLLM uses). Elsewhere it
builds the pure-Python package: the plugin then JIT-builds the kernels at first use if it can, or
serves through its torch fallback, and says which in the log. Metadata lives in pyproject.toml."""

import os

from setuptools import setup

# Ampere and Hopper. The same flags as the JIT build in vllm_gqsa/kernels/cuda.py, which the
# kernel tests ran with.
ARCH_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]


def cuda_extension():
    if os.environ.get("VLLM_GQSA_SKIP_CUDA_BUILD"):
        return [], {}, "VLLM_GQSA_SKIP_CUDA_BUILD is set"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}, "torch is not importable in the build environment (use --no-build-isolation)"
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}, "no CUDA build of torch or no CUDA toolkit"
    ext = CUDAExtension(
        "vllm_gqsa._C", ["csrc/gqsa_kernels.cu", "csrc/torch_bindings.cpp"],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", *ARCH_FLAGS]})
    return [ext], {"build_ext": BuildExtension}, None


ext_modules, cmdclass, skipped = cuda_extension()
if skipped:
    print(f"vllm-gqsa: building without the CUDA kernels ({skipped})")
setup(ext_modules=ext_modules, cmdclass=cmdclass)
