"""What every edit takes and returns, and how it refuses.

An operation is one function ``run(image, product, label, params, ctx) -> Edit`` and one params
model (a subclass of :class:`OpParams`), registered once in :mod:`pipeline.ops.actions`.

``Edit.edit_mask`` is the contract the QA gate (:mod:`pipeline.run.qa`) proves: every pixel where
``Edit.image`` may differ from the input is True there; every pixel where it is False is
bit-identical to the input. ``Edit.product_mask`` is where the product is afterwards, so the
next edit (and every other product in the image) works on what is really there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

from pipeline.errors import BadInput


class EditError(BadInput):
    """An edit refused for a reason the user can act on (e.g. the product would leave the frame
    beyond the allowed share). ``str()`` is the full, human-readable message."""


def checked_product_mask(image: Image.Image, mask: np.ndarray, op: str, verb: str) -> np.ndarray:
    """The product mask of an edit's input as HxW bool, after checking the input: ``image`` a PIL
    ``"RGB"`` image (ValueError otherwise: the caller converts), ``mask`` HxW matching it
    (ValueError) and not empty (:class:`EditError` "``op``: ... nothing to ``verb``")."""
    if not isinstance(image, Image.Image) or image.mode != "RGB":
        raise ValueError(f"{op} expects a PIL RGB image, got {getattr(image, 'mode', type(image).__name__)} "
                         "(convert first)")
    W, H = image.size
    m = np.asarray(mask)
    if m.shape != (H, W):
        raise ValueError(f"product mask shape {m.shape} does not match the image ({H}, {W})")
    m = m.astype(bool, copy=False)
    if not m.any():
        raise EditError(f"{op}: the product mask is empty; nothing to {verb}")
    return m


class OpParams(BaseModel):
    """Base of every operation's parameters. A subclass declares the operation's own fields (e.g.
    displace's ``x``, ``y``) and ``settings``, the operation's settings section with this action's
    overrides applied (built by :func:`pipeline.ops.actions.parse_action`). ``section`` names that
    section in :class:`~pipeline.settings.Settings`."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    section: ClassVar[str]

    def own(self) -> dict[str, Any]:
        """The operation's own fields that were set (JSON-able), without the settings section."""
        return self.model_dump(mode="json", exclude={"settings"}, exclude_none=True)


@dataclass
class EditContext:
    """What an operation may use besides the image: the settings in force, the model registry
    (None for operations that need no model) and the product classes of the rules."""

    settings: Any
    registry: Any = None
    classes: list[Any] | None = None


@dataclass
class Moved:
    """The product moved rigidly: every pixel of ``source_mask`` (HxW bool, input coordinates) is
    at ``(x + dx, y + dy)`` in the result with the same value, where that lies inside the frame.
    ``allowed_outside``: the share of the product that may end outside the frame (1.0 when the
    user asked for clipping)."""

    source_mask: np.ndarray
    dx: int
    dy: int
    allowed_outside: float = 1.0


@dataclass
class Edit:
    """The result of one edit.

    ``image``: PIL image, mode ``"RGB"`` (uint8, 0..255, R, G, B order), the input's size.
    ``edit_mask``: HxW ``bool`` numpy array (H, W = the image's height and width); True on every
    pixel that may differ from the input, False where the output equals the input exactly.
    ``product_mask``: HxW ``bool``, where the edited product is in ``image`` (unchanged for an
    edit that restyles in place; shifted for displace; the new view for rotate).
    ``record``: JSON-serialisable dict describing what was done (parameters, seeds, backends,
    scores, timings, model provenance). ``moved``: set when the product's own pixels were moved
    unchanged (displace), so QA can prove it.

    ``transform``: set when the edit changed the image's size (``frame``: crop, pad, scale): the
    :class:`~pipeline.ops.geometry.Transform` from the input to ``image``. Then ``edit_mask`` and
    ``product_mask`` are in the *output's* size, and "unchanged" outside ``edit_mask`` means
    "equal to ``transform.apply(input)``" (QA recomputes it). ``alpha``: HxW uint8 (255 = opaque)
    when the result has transparency (``background: transparent``); None = opaque.
    """

    image: Image.Image
    edit_mask: np.ndarray
    product_mask: np.ndarray
    record: dict[str, Any] = field(default_factory=dict)
    moved: Moved | None = None
    transform: Any = None  # pipeline.ops.geometry.Transform
    alpha: np.ndarray | None = None

    def __post_init__(self) -> None:
        w, h = self.image.size
        if self.image.mode != "RGB":
            raise TypeError(f"Edit.image must be mode RGB, got {self.image.mode}")
        for name in ("edit_mask", "product_mask"):
            m = getattr(self, name)
            if not isinstance(m, np.ndarray) or m.shape != (h, w) or m.dtype != bool:
                raise TypeError(f"Edit.{name} must be a bool array of shape {(h, w)}, "
                                f"got {getattr(m, 'dtype', type(m).__name__)} {getattr(m, 'shape', '')}")
        if self.alpha is not None and (self.alpha.shape != (h, w) or self.alpha.dtype != np.uint8):
            raise TypeError(f"Edit.alpha must be a uint8 array of shape {(h, w)}")
        if self.transform is not None and tuple(self.transform.out_size) != (w, h):
            raise TypeError(f"Edit.transform's output size {self.transform.out_size} is not the image's {(w, h)}")
