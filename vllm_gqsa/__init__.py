# SPDX-License-Identifier: Apache-2.0
"""vllm-gqsa: GQSA (group quantization and sparsity) checkpoints served by vLLM."""

__version__ = "0.1.0"


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group: registers the ``gqsa`` method."""
    from . import quantization  # noqa: F401  (its decorator registers the config with vLLM)
