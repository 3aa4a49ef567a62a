"""The real `watch` command with the model-free pass-through processor (test-only entry point).

``python tests/watch_passthrough.py watch --config ... [watch flags]`` runs exactly what
``product-studio watch`` runs (settings, flags, lock, signals, logging, ledger, worker, outputs),
except that the processor comes from :func:`helpers.processors.make_passthrough` instead of
:func:`pipeline.run.process.make_processor`. The subprocess tests of the daemon use it to kill, signal
and restart a real daemon process without loading any model."""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))  # helpers/ (a script's own folder is sys.path[0]; stated, not assumed)
    sys.path.insert(1, str(here.parent))  # the repository, whichever folder the script is run from

    import pipeline.run.process
    from helpers.processors import make_passthrough

    pipeline.run.process.make_processor = make_passthrough

    from cli.app import app
    from cli.daemon_cmd import register

    register(app)
    app()
