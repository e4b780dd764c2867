# SPDX-License-Identifier: Apache-2.0
"""Offline conversion of Hugging Face models into GQSA checkpoints (``gqsa-convert``)."""

import logging


def show_progress() -> bool:
    """Whether the converters draw progress bars: yes, unless the ``converters`` logger was set
    above INFO (``gqsa-convert -q`` does that), so a caller that configures no logging still
    sees them."""
    return logging.getLogger(__name__).level <= logging.INFO
