"""Server-fit heads over loopback HTTP: real client runtimes upload class statistics in round 1
(nothing else), and the server serves each family the LDA head of every client's statistics,
bridged across families through the device that runs both."""

from __future__ import annotations

import dataclasses

import torch

from edgetune.client.runtime import ClientRuntime
from edgetune.client.transport import ServerClient
from edgetune.config import ClientConfig, ClientGroup
from edgetune.protocol import HEAD_BIAS, HEAD_WEIGHT, initial_tensors
from edgetune.strategies.class_stats import ClientStats, heads_from_clients

from .conftest import JOIN_TOKEN
from .test_final_model import BACKBONE, _client_config, _run_all, wait_for_final

OTHER = "tiny-bert-d48-l3"
CLASSES = ("computers", "food", "law")


def _runtime(url: str, state, backbone: str, shard: int, **client) -> ClientRuntime:
    config = _client_config(url, state, CLASSES)
    me = ClientConfig(**{**dataclasses.asdict(config.client), "backbone": backbone,
                         "shard": shard, "shards": 2, **client})  # fmt: skip
    return ClientRuntime(dataclasses.replace(config, client=me), JOIN_TOKEN)


def test_round_one_serves_each_family_the_lda_head_of_all_clients_statistics(live_server, tmp_path):
    groups = (ClientGroup(backbone=BACKBONE, also=(OTHER,)), ClientGroup(backbone=OTHER))
    srv = live_server(rounds=1, min_clients=3, groups=groups)
    first = _runtime(srv.url, tmp_path / "a", BACKBONE, 0, bridges=(OTHER,))
    second = _runtime(srv.url, tmp_path / "b", OTHER, 0, stats_source=False)  # same device
    lone = _runtime(srv.url, tmp_path / "c", OTHER, 1)
    other_family = lone.spec.family
    assert first.spec.stats == "source" and first.spec.bridges == ((other_family, 48),)
    assert second.spec.stats == "own" and lone.spec.stats == "source"
    _run_all([first, second, lone])
    reports = [
        ClientStats.from_wire(rt.spec.family, rt._round_stats) for rt in (first, second, lone)
    ]
    expected = heads_from_clients(reports)
    assert set(expected) == {first.spec.family, other_family}
    for rt in (first, lone):
        family = rt.spec.family
        wait_for_final(tmp_path / "state" / "final" / family, 1)
        served = ServerClient(srv.url, token=rt.state["token"])
        model, _ = served.download(f"/v1/families/{family}")
        served.close()
        weight, bias = expected[family]
        # float32 statistics on the wire, float64 fit on both sides: float32 rounding apart
        assert torch.allclose(model[HEAD_WEIGHT].double(), weight, rtol=1e-4, atol=1e-5)
        assert torch.allclose(model[HEAD_BIAS].double(), bias, rtol=1e-4, atol=1e-4)
        # round 1 trains nothing: every other family tensor is still the initial one
        _, initial = initial_tensors(rt.spec, seed=rt.config.seed)
        for name, value in initial.items():
            if name not in (HEAD_WEIGHT, HEAD_BIAS):
                assert torch.equal(model[name], value), name
