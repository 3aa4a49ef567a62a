"""What every proposal mode returns: :class:`Proposals`, candidate masks for the CLIP step.

Its own module so the detector (:mod:`pipeline.detect.detector`) and the front-ends
(:mod:`pipeline.detect.fronts`) share it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Proposals:
    """Candidate masks. ``masks``: [M, h, w] bool at a working resolution; ``logits``: per
    candidate low-res logits (guided) for exact full-res upsampling later, or None (everything,
    whose masks are already full resolution)."""

    masks: np.ndarray
    boxes: np.ndarray  # [M, 4] float, full-resolution pixel coordinates
    quality: np.ndarray  # [M] SAM predicted IoU
    logits: Any = None
    work_scale: float = 1.0  # working resolution / full resolution
