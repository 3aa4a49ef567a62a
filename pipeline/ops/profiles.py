"""Marketplace profiles: named bundles of background + frame + output + compliance rules.

The shipped presets (:data:`PRESETS`) are built from the marketplaces' published image rules;
``docs/profiles.md`` cites the source of each rule and says which figures are ours (where a
marketplace gives a recommendation rather than a number, or gives none). Settings may add
profiles or replace a preset (``profiles:`` in the settings file); :func:`get_profile` resolves a
name, :func:`profile_actions` turns a profile into the ``background`` / ``frame`` actions that
the processor runs after the plan.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import BadInput
from pipeline.settings import CheckSettings, OutputSettings, ProfileSettings
from pipeline.ops.actions import parse_action

# Where each preset's rules were read (docs/profiles.md cites each rule; the marketplaces' own
# pages were not all reachable here, and those that were not are marked there, not invented).
AMAZON_SOURCES = ["https://mercatuslab.com/blog/amazon-product-image-requirements",
                  "https://editthispic.com/guides/amazon-product-photo-requirements"]
SHOPIFY_SOURCES = ["https://www.pixfocal.com/guides/shopify-product-image-size",
                   "https://sellshot.ai/en/blog/shopify-product-image-size-guide"]
ETSY_SOURCES = ["https://dev.to/herofab/check-product-photos-against-amazon-etsy-and-96-other-marketplace-image-rules-"
                "with-a-free-api-no-5982", "https://www.etsyshop.ai/to-sell-on-etsy/etsys-new-thumbnail-image-format-"
                "revealed-3538"]
GOOGLE_SOURCES = ["https://support.google.com/merchants/answer/6324350"]

PRESETS: dict[str, ProfileSettings] = {
    "amazon-main": ProfileSettings(
        description="Amazon main image: pure white (255, 255, 255) background, product filling 85% of the frame, "
                    "long side >= 1600 px (zoom), sRGB JPEG, no borders",
        background={"mode": "color", "color": "#FFFFFF", "shadow": "none"},
        frame={"aspect": "1:1", "fill": 0.85, "min_long_side": 1600, "pad_color": "#FFFFFF"},
        output=OutputSettings(format="jpeg", quality=95, srgb=True, metadata="keep"),
        check=CheckSettings(background="#FFFFFF", min_background_share=0.99, min_fill=0.85, max_fill=1.0,
                            min_long_side=1600, max_long_side=10000, formats=["JPEG", "PNG", "TIFF", "GIF"],
                            srgb=True, no_borders=True),
        sources=AMAZON_SOURCES,
    ),
    "shopify": ProfileSettings(
        description="Shopify product image: 2048 x 2048 square (Shopify's recommendation), white padding, WebP",
        background=None,
        frame={"size": (2048, 2048), "fill": 0.85, "pad_color": "#FFFFFF"},
        output=OutputSettings(format="webp", quality=90, srgb=True, metadata="keep"),
        check=CheckSettings(square=True, min_long_side=2048, max_long_side=4472, srgb=True,
                            formats=["JPEG", "PNG", "WEBP", "GIF", "HEIC", "AVIF"], max_bytes=20 * 1024 * 1024),
        sources=SHOPIFY_SOURCES,
    ),
    "etsy": ProfileSettings(
        description="Etsy listing photo: 2000 px wide, 5:4 (Etsy's recommended ratio), sRGB JPEG",
        background=None,
        frame={"aspect": "5:4", "fill": 0.8, "min_long_side": 2000, "pad_color": "#FFFFFF"},
        output=OutputSettings(format="jpeg", quality=90, srgb=True, metadata="keep"),
        check=CheckSettings(min_short_side=635, min_long_side=2000, formats=["JPEG", "PNG", "GIF"], srgb=True,
                            max_bytes=1024 * 1024 * 10),
        sources=ETSY_SOURCES,
    ),
    "google-shopping": ProfileSettings(
        description="Google Merchant Center main image: product on white, at least 500 x 500 (required from "
                    "31 Jan 2027; 1500 x 1500 recommended), at most 16 MB, no borders, JPEG",
        background={"mode": "color", "color": "#FFFFFF", "shadow": "none"},
        frame={"aspect": "1:1", "fill": 0.85, "min_long_side": 1500, "pad_color": "#FFFFFF"},
        output=OutputSettings(format="jpeg", quality=92, srgb=True, metadata="keep"),
        check=CheckSettings(min_short_side=500, max_bytes=16 * 1024 * 1024,
                            formats=["JPEG", "WEBP", "PNG", "GIF", "BMP", "TIFF"], no_borders=True),
        sources=GOOGLE_SOURCES,
    ),
}


def all_profiles(settings: Any) -> dict[str, ProfileSettings]:
    """The presets, with the settings file's ``profiles`` added over them."""
    return {**PRESETS, **(getattr(settings, "profiles", None) or {})}


def get_profile(name: str, settings: Any) -> ProfileSettings:
    """The profile ``name``; raises :class:`BadInput` naming the known ones."""
    known = all_profiles(settings)
    if name not in known:
        raise BadInput(f"unknown profile {name!r} (known: {', '.join(sorted(known))})")
    return known[name]


def profile_actions(name: str, settings: Any) -> list[Any]:
    """The profile's ``frame`` then ``background`` actions (validated like a rule's).
    Raises :class:`~pipeline.errors.ParamsError` for a bad override."""
    prof = get_profile(name, settings)
    out = []
    # Frame first: the background's soft edge is then drawn at the output's resolution, not
    # blown up with the product when the frame scales it.
    if prof.frame is not None:
        out.append(parse_action("frame", prof.frame, settings, bases=(None, settings.base_dir)))
    if prof.background is not None:
        out.append(parse_action("background", prof.background, settings, bases=(None, settings.base_dir)))
    return out


def file_suffix(fmt: str) -> str:
    return {"jpeg": "jpg", "png": "png", "webp": "webp", "avif": "avif", "tiff": "tif"}[fmt]
