"""Session-wide tiny model set: built once (seconds), loaded through the real registry code."""

from __future__ import annotations

import os

import pytest

# Tests never reach the Hub: everything comes from the tiny set or fails loudly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from pipeline.models.tiny import make_tiny_set

    d = tmp_path_factory.mktemp("tiny")
    make_tiny_set(d)
    return d


@pytest.fixture(scope="session")
def tiny_settings(tiny_dir):
    from pipeline.settings import load_settings

    return load_settings(tiny_dir / "settings.yaml")


@pytest.fixture(scope="session")
def registry(tiny_settings):
    from pipeline.models.registry import ModelRegistry

    return ModelRegistry(tiny_settings)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    # The tiny models gain nothing from intra-op threads, while on a busy 2-CPU runner OpenMP's
    # spin-waiting made model tests several times slower.
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
