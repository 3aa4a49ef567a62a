"""Zero123's relative camera change and its limits, without torch (rule files are checked with it).

Conventions (Zero123): azimuth + = the camera moves right, polar + = the camera moves down,
radius + = farther; degrees for the angles, a relative distance for the radius.
"""

from __future__ import annotations

import math

import numpy as np

AZIMUTH_LIMIT = 180.0
POLAR_LIMIT = 90.0
RADIUS_LIMIT = 0.5


def check_pose(polar: float, azimuth: float, radius: float = 0.0, *, max_polar: float = POLAR_LIMIT) -> None:
    """Raise ValueError (naming the value, the range and the sign convention) unless azimuth lies in
    [-180, 180], |polar| <= ``max_polar`` (at most 90) and |radius| <= 0.5."""
    for name, v in (("azimuth", azimuth), ("polar", polar), ("radius", radius)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise ValueError(f"rotate: {name} must be a finite number, got {v!r}")
    if not -AZIMUTH_LIMIT <= azimuth <= AZIMUTH_LIMIT:
        raise ValueError(f"rotate: azimuth {azimuth:g} degrees is outside -180..180 "
                         "(+ turns the camera to the right, - to the left; 180 = from behind)")
    lim = min(float(max_polar), POLAR_LIMIT)
    if not -lim <= polar <= lim:
        raise ValueError(f"rotate: polar {polar:g} degrees is outside -{lim:g}..{lim:g} "
                         "(+ moves the camera down, - moves it up; rotate.max_polar sets the limit, at most 90)")
    if not -RADIUS_LIMIT <= radius <= RADIUS_LIMIT:
        raise ValueError(f"rotate: radius {radius:g} is outside -0.5..0.5 (relative camera distance, + = farther)")
