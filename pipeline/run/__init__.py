"""The ``run`` room: one image through detection, rules, edits and the QA gate
(:mod:`.process`), rule files, catalog runs (many inputs, manifest, report) and detection runs.

Imports every room below it (``ops``, ``detect``, ``models``, ``io``); ``engine``, the daemon
and the CLI use it.
"""
