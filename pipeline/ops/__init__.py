"""The ``ops`` room: the edit operations (one module each: enhance, rotate, displace, background,
frame), the operation table and typed actions (:mod:`.actions`), what an edit returns
(:mod:`.edits`), and the helpers they share: fill (:mod:`.inpaint`), matting,
depth, upscaling, size changes, marketplace profiles and compliance measurement.

Imports ``detect``, ``models`` and ``io``; ``run`` uses it.
"""
