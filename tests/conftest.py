"""Test-wide environment: must run before any kernel module is imported.

TRITON_INTERPRET has to be set before the @triton.jit functions are defined, and no code path
may reach a model hub, so both are forced here rather than trusted to the caller.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu`-marked tests cleanly when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Each run converts MiniLM-L3 afresh into its own cache, as a clean machine would."""
    os.environ["EDGETUNE_CACHE"] = str(tmp_path_factory.mktemp("edgetune-cache"))


@pytest.fixture(scope="session")
def minilm_l6():
    from edgetune.models.zoo import load_backbone

    return load_backbone("minilm-l6")


@pytest.fixture(scope="session")
def minilm_l3():
    from edgetune.models.zoo import load_backbone

    return load_backbone("minilm-l3")
