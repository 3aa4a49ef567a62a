"""The ``io`` room: bytes in and out. The one image loader (:mod:`.imageio`), the one output writer
(stems, result files, JSON records: :mod:`.outputs`), the mask and compositing primitives
every room shares (:mod:`.composite`), file hashing and generated sample photos.

Imports only :mod:`pipeline.errors` and :mod:`pipeline.settings`; every other room may import it.
"""
