# SPDX-License-Identifier: Apache-2.0
"""One launch pattern of the TMA prefill experiment, for Nsight Compute (ncu_wgmma_prefill_v6_*.txt):
the q/k/v shape (12288 x 4096) at 512 tokens, three calls of one build. From the repository root:

    python3 benchmarks/results/gpu/wgmma_prefill_profile.py LIB.so VARIANT

VARIANT is the harness's v (0 the kernel, 13 its skeleton: no copies, no dequantization).
"""
import ctypes
import importlib.util
import sys

import torch

spec = importlib.util.spec_from_file_location("harness", "benchmarks/results/gpu/wgmma_prefill_experiment.py")
harness = importlib.util.module_from_spec(spec)
spec.loader.exec_module(harness)

lib = ctypes.CDLL(sys.argv[1])
variant = int(sys.argv[2])
N, K, M = 12288, 4096, 512
weights = harness.make(N, K)
x = torch.randn(M, K, device="cuda").half()
y = torch.empty(M, N, device="cuda").half()
for _ in range(3):
    harness.call(lib, weights, x, y, M, N, K, 64, variant)
torch.cuda.synchronize()
