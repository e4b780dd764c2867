# SPDX-License-Identifier: Apache-2.0
"""vllm-gqsa: GQSA (group quantization and sparsity) checkpoints served by vLLM."""

__version__ = "0.1.0"


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group: registers the ``gqsa`` method, and the
    baselines the benchmarks compare against that vLLM does not serve itself: ``sparse24`` (fp16
    2:4 through cuSPARSELt) and ``gptq_w2`` (2-bit GPTQ through vLLM's ExLlama kernel)."""
    from . import gptq_w2, quantization, sparse24  # noqa: F401  (their decorators register the configs)
    from .kernels import cuda

    cuda.log_install()  # one line when the package was built without its CUDA kernels
