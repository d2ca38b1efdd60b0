"""Kernel tests run torch on one intra-op thread.

Every tensor here is tiny (T <= 130, d <= 130), so a second thread buys nothing, and on a
shared 2-core machine OpenMP's spinning worker made single cases ~10x slower (3.8 s vs 0.4 s).
"""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")  # restored after each module: no leak
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
