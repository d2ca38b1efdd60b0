"""The client runtime against a real server process: resume after a restart, retries, errors."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from edgetune.client.runtime import ClientRuntime, ClientSettings, ShardSpec
from edgetune.client.transport import ServerClient, ServerError
from edgetune.config import AdapterConfig, TrainConfig

JOIN = "client-runtime-test-join-token-000"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "edgetune.server",
        "--state",
        str(tmp_path / "server"),
        "--port",
        str(port),
        "--set",
        "min_clients=1",
        "--set",
        "max_rounds=2",
    ]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "EDGETUNE_JOIN_TOKEN": JOIN},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    yield url
    proc.kill()
    proc.wait()


def _settings(url: str, state: Path, max_rounds: int) -> ClientSettings:
    shard = ShardSpec(dataset="fortunes", categories=("computers", "food"), max_per_class=20)
    return ClientSettings(
        server=url,
        join_token=JOIN,
        backbone="tiny-bert-d32-l2",
        state_dir=state,
        shard=shard,
        adapter=AdapterConfig(rank=4, n_anchors=1),
        train=TrainConfig(batch_size=8, max_length=16),
        max_rounds=max_rounds,
        poll_s=0.1,
        eval_test_at_end=False,
    )


def test_a_restarted_client_resumes_with_its_private_branch(server, tmp_path):
    state = tmp_path / "client"
    first = ClientRuntime(_settings(server, state, max_rounds=1))
    first.run()
    saved = json.loads((state / "client.json").read_text())
    assert saved["last_round"] == 1
    private = first.handle.state_dict_for("private")
    assert any(t.abs().sum() > 0 for t in private.values())  # training moved it

    second = ClientRuntime(_settings(server, state, max_rounds=2))  # a new process, same dir
    assert second.state["client_id"] == saved["client_id"]  # no second registration
    for name, tensor in second.handle.state_dict_for("private").items():
        assert torch.equal(tensor, private[name])
    second.run()
    assert json.loads((state / "client.json").read_text())["last_round"] == 2
    lines = (state / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2]
    status = ServerClient(server, token=saved["token"]).status()
    assert status["current"]["finished"]


def test_unreachable_server_is_retried_then_named():
    client = ServerClient(f"http://127.0.0.1:{_free_port()}", retries=2, backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(ServerError, match="after 3 attempts"):
        client.health()
    assert time.monotonic() - start < 5


def test_a_4xx_is_not_retried(server):
    client = ServerClient(server, token="not-a-real-token", retries=5, backoff_s=5.0)
    start = time.monotonic()
    with pytest.raises(ServerError) as err:
        client.current_round()
    assert err.value.status == 401 and time.monotonic() - start < 2


def test_train_flops_of_a_quantized_client_equal_the_fp32_count(tmp_path):
    """bitsandbytes matmuls have no FLOP formula; the client counts on an fp32 copy instead."""
    counts = {}
    for quant in ("none", "nf4"):
        settings = ClientSettings(
            server="http://127.0.0.1:9",
            join_token=JOIN,
            backbone="tiny-bert-d64-l2",
            quant=quant,
            state_dir=tmp_path / quant,
            adapter=AdapterConfig(rank=4),
            shard=ShardSpec(dataset="fortunes", categories=("food", "law"), max_per_class=20),
            train=TrainConfig(batch_size=8, max_length=16),
        )
        counts[quant] = ClientRuntime(settings).train_flops_per_sample
    assert counts["none"] > 0 and counts["nf4"] == counts["none"]
