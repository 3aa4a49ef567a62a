"""The ``detect`` room: which configured products an image holds, and the skip.

:mod:`.detector` owns the decision (proposals -> CLIP against every class and the background ->
thresholds, margin, merging) and the segment-anything proposer; :mod:`.fronts` the other
proposal front-ends (transformers SAM-family segmenters, ``grounded``, ``clipseg``, ``sam3``);
:mod:`.proposals` what every front-end returns.

Imports ``models`` and ``io``; ``ops`` and ``run`` use it.
"""
