"""The ``detect`` room: which configured products an image holds (SAM + CLIP), and the skip.

Imports ``models`` and ``io``; ``ops`` and ``run`` use it.
"""
