# SPDX-License-Identifier: Apache-2.0
"""GQSA kernels: the CUDA kernel format (pure torch, CPU-testable) and the CUDA ops.

Importing this package never builds or loads anything; :func:`cuda.available` does, on first use.
"""

from . import cuda, cuda_format

__all__ = ["cuda", "cuda_format"]
