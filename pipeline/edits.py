"""What every edit (enhance, rotate, displace) returns, and how it refuses.

An edit is a function ``(image, detection, params, models) -> Edit``. ``Edit.edit_mask`` is the
contract QA checks: every pixel where ``Edit.image`` may differ from the input is True there;
every pixel where it is False is bit-identical to the input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image


class EditError(ValueError):
    """An edit refused for a reason the user can act on (e.g. the product would leave the frame
    beyond the allowed share). ``str()`` is the full, human-readable message."""


@dataclass
class Edit:
    """The result of one edit.

    ``image``: PIL image, mode ``"RGB"`` (uint8, 0..255, R, G, B order), the input's size.
    ``edit_mask``: HxW ``bool`` numpy array (H, W = the image's height and width); True on every
    pixel that may differ from the input, False where the output equals the input exactly.
    ``record``: JSON-serialisable dict describing what was done (parameters, seeds, backends,
    scores, timings, model provenance).
    """

    image: Image.Image
    edit_mask: np.ndarray
    record: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        w, h = self.image.size
        if self.image.mode != "RGB":
            raise ValueError(f"Edit.image must be mode RGB, got {self.image.mode}")
        if self.edit_mask.shape != (h, w) or self.edit_mask.dtype != bool:
            raise ValueError(f"Edit.edit_mask must be a bool array of shape {(h, w)}, "
                             f"got {self.edit_mask.dtype} {self.edit_mask.shape}")
