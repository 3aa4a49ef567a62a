"""The ``engine`` room: where runs execute beyond one process: the Ray actor pool
(:mod:`.ray_engine`). The local engine is :mod:`pipeline.run.catalog`'s job loop.

Imports ``run``; the daemon and the CLI use it.
"""
