"""Flower tests: real engines (Ray simulation, SuperLink + SuperNodes) on loopback, offline."""

from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="needs the flower extra: pip install 'edgetune[flower]'")

TINY = Path(__file__).parents[1] / "data" / "tiny_sim.toml"
#: Two families, one client each: the smallest heterogeneous federation.
TWO_FAMILIES = 'group=[{backbone="tiny-bert-d32-l2"}, {backbone="tiny-bert-d48-l3"}]'


@pytest.fixture(autouse=True)
def _flower_home(tmp_path, monkeypatch):
    """Each test its own FLWR_HOME, offline switches on, and none of Ray's usage stats."""
    from edgetune.sim.flower.env import OFFLINE_ENV

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flower-home"))
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
