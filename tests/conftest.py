import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ldm_engine.components import build_random, save_model  # noqa: E402
from ldm_engine.configs import TINY  # noqa: E402


@pytest.fixture(scope="session")
def tiny_components():
    return build_random(TINY, seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_components):
    """A tiny random SD-1.x-architecture model saved as a diffusers folder (read-only for tests)."""
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_model(tiny_components, path)
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
