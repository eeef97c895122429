"""Shared test fixtures: seeded generators, a temporary directory per test, and the `gpu` marker."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _few_threads():
    # Tiny test models gain nothing from intra-op threads; one thread avoids contention on small machines.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="session")
def _scene_cache(tmp_path_factory):
    # Training caches of the tests go to a folder of their own, never the user's cache.
    patch = pytest.MonkeyPatch()
    patch.setenv("MULTIMODAL_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded generator so every test draws fresh but reproducible random inputs."""
    return torch.Generator().manual_seed(1234)
