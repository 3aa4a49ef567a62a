"""The ``models`` room: the one model registry (:mod:`.registry`: roles, loading, derived
pipelines, adapters, locks), the Hub download path (:mod:`.hub`), checkpoint layouts
(segment-anything, Zero123), LoRA files, few-step samplers and the tiny random-weight sets.

Imports :mod:`pipeline.io` and the base modules; ``detect``, ``ops``, ``run`` and ``engine`` use it.
"""
