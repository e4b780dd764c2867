# SPDX-License-Identifier: Apache-2.0
"""Builds the CUDA kernels into ``vllm_gqsa._C`` when a CUDA build of torch and nvcc are present
(``pip install --no-build-isolation .``, so the build sees the torch vLLM uses). Elsewhere it
builds the pure-Python package: the plugin then JIT-builds the kernels at first use if it can, or
serves through its torch fallback, and says which in the log. Either way the package carries the
CUDA sources as ``vllm_gqsa/csrc/``, which is where an installed plugin JIT-builds them from.
Metadata lives in pyproject.toml; ``make wheel`` builds the sdist and the wheel into dist/."""

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC_SUFFIXES = (".cu", ".h", ".cpp")

# Ampere and Hopper, plus the Ampere code as PTX, which the driver compiles for newer GPUs.
# TORCH_CUDA_ARCH_LIST (torch's own variable, e.g. "8.0;9.0a;10.0+PTX") replaces this list: torch
# reads it only where the flags name no architecture. (The JIT build in vllm_gqsa/kernels/cuda.py
# compiles for the GPU it runs on, with the same compiler flags otherwise.)
ARCH_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
              "-gencode=arch=compute_80,code=compute_80"]


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
                            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr",
                                     *([] if os.environ.get("TORCH_CUDA_ARCH_LIST") else ARCH_FLAGS)]})
    return [ext], {"build_ext": BuildExtension}, None


class build_py_with_csrc(build_py):
    """Copies csrc/ into the package as vllm_gqsa/csrc/: a wheel has no repository beside it, and
    without the sources a package built without CUDA could never JIT-build its kernels."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads the checkout's csrc/
            return
        dest = Path(self.build_lib, "vllm_gqsa", "csrc")
        self.mkpath(str(dest))
        for src in sorted(Path("csrc").iterdir()):
            if src.suffix in CSRC_SUFFIXES:
                self.copy_file(str(src), str(dest / src.name))


ext_modules, cmdclass, skipped = cuda_extension()
if skipped:
    print(f"vllm-gqsa: building without the CUDA kernels ({skipped})")
setup(ext_modules=ext_modules, cmdclass={**cmdclass, "build_py": build_py_with_csrc})
