# SPDX-License-Identifier: Apache-2.0
"""Offline conversion of Hugging Face models into GQSA checkpoints (``gqsa-convert``)."""
