# SPDX-License-Identifier: Apache-2.0
"""Runs the tensor-core kernel three times on one random W4 S50% g16 layer, for a profiler:

    ncu --kernel-name regex:tc_kernel --launch-skip 2 --launch-count 1 --section SpeedOfLight \\
        --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \\
        --section Occupancy --section LaunchStats --section InstructionStats --section SourceCounters \\
        python benchmarks/tc_once.py N K M
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_speed import DENSITY, make_gqsa  # noqa: E402

from vllm_gqsa.kernels import cuda  # noqa: E402


def main() -> None:
    N, K, M = (int(a) for a in sys.argv[1:4])
    t = make_gqsa(N, K, DENSITY, cuda.default_num_ctas())
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    for _ in range(3):
        y = cuda.tc(x, t, N)
    torch.cuda.synchronize()
    print(f"tc_kernel: y {tuple(y.shape)}")


if __name__ == "__main__":
    main()
