# SPDX-License-Identifier: Apache-2.0
"""The torch-free CUDA kernels compile for Hopper (sm_90a) and Ampere (sm_80) with plain nvcc."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "csrc" / "gqsa_kernels.cu"
ARCH_FLAGS = ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_kernels_compile(tmp_path):
    # --threads 0: the two architectures compile side by side, one per core. Each takes 3 to 8
    # minutes on a 2-core machine (the sm_90a instances most), so the limit leaves room for a slow one.
    cmd = ["nvcc", "-c", "-std=c++17", "--threads", "0", *ARCH_FLAGS, str(KERNELS),
           "-o", str(tmp_path / "gqsa_kernels.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "gqsa_kernels.o").stat().st_size > 0
