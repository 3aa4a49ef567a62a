"""The image pipeline shared by the daemon and the CLI.

Import submodules directly (``from pipeline.settings import load_settings``); this package's
``__init__`` stays empty of heavy imports so ``product-studio --help`` is instant.
"""

PIPELINE_VERSION = "0.1.0"
