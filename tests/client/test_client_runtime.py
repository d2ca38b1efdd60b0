"""The client runtime against a real server process: resume after a restart, retries, errors."""

import dataclasses
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

from edgetune.client.runtime import ClientRuntime
from edgetune.client.transport import ServerClient, ServerError
from edgetune.config import AdapterConfig, ClientConfig, DataConfig, RunConfig, TrainConfig

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
        "server.min_clients=1",
        "--set",
        "rounds=2",
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


def _config(url: str, state: Path, max_rounds: int = 0, head: str = "sgd", **client) -> RunConfig:
    """A tiny client; ``head="sgd"`` by default so round 1 trains (with ``"stats"`` round 1
    only gathers class statistics: `test_stats_heads.py` covers that path)."""
    keys = {"backbone": "tiny-bert-d32-l2", "poll_s": 0.1, "eval_test_at_end": False, **client}
    return RunConfig(
        rounds=2,
        data=DataConfig(categories=("computers", "food"), max_per_class=20),
        adapter=AdapterConfig(rank=4, n_anchors=1),
        train=TrainConfig(batch_size=8, max_length=16, head=head),
        client=ClientConfig(url=url, state_dir=str(state), max_rounds=max_rounds, **keys),
    )


def test_a_restarted_client_resumes_with_its_private_branch(server, tmp_path):
    state = tmp_path / "client"
    first = ClientRuntime(_config(server, state, max_rounds=1), JOIN)
    first.run()
    saved = json.loads((state / "client.json").read_text())
    assert saved["last_round"] == 1
    private = first.handle.state_dict_for("private")
    assert any(t.abs().sum() > 0 for t in private.values())  # training moved it

    second = ClientRuntime(_config(server, state, max_rounds=2), JOIN)  # a new process, same dir
    assert second.state["client_id"] == saved["client_id"]  # no second registration
    for name, tensor in second.handle.state_dict_for("private").items():
        assert torch.equal(tensor, private[name])
    second.run()
    assert json.loads((state / "client.json").read_text())["last_round"] == 2
    lines = (state / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2]
    status = ServerClient(server, token=saved["token"]).status()
    assert status["current"]["finished"]


def test_joining_a_finished_server_says_so(server, tmp_path, caplog):
    """Issue 17: a client joining a finished server exited 0 with 0 rounds and no message."""
    first = ClientRuntime(_config(server, tmp_path / "a"), JOIN)
    first.run()  # rounds=2, min_clients=1: the run finishes
    token = json.loads((tmp_path / "a" / "client.json").read_text())["token"]
    assert ServerClient(server, token=token).status()["current"]["finished"]
    with caplog.at_level("WARNING", logger="edgetune"):
        ClientRuntime(_config(server, tmp_path / "late"), JOIN).run()
    late = [r.getMessage() for r in caplog.records if "already finished" in r.getMessage()]
    assert late == [f"the server at {server} has already finished its rounds; nothing to train"]


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
        config = _config("", tmp_path / quant, backbone="tiny-bert-d64-l2", quant=quant)
        config = dataclasses.replace(
            config, data=DataConfig(categories=("food", "law"), max_per_class=20)
        )
        counts[quant] = ClientRuntime(config).train_flops_per_sample
    assert counts["none"] > 0 and counts["nf4"] == counts["none"]


def test_error_feedback_residual_changes_only_when_the_server_accepts(server, tmp_path):
    """A refused upload (409) leaves the int8 residual as it was; an accepted one moves it."""
    config = _config(server, tmp_path / "c", max_rounds=1)
    config = dataclasses.replace(config, comm=dataclasses.replace(config.comm, compression="int8"))
    client = ClientRuntime(config, JOIN)
    client.register()
    info = client.server.current_round()
    sent_global = client.download_models(info)
    with torch.no_grad():  # a trained-looking global branch, so its deltas are not all zero
        for p in client.handle.named_tensors("global").values():
            p.add_(torch.linspace(-0.3, 0.7, p.numel()).reshape(p.shape))
    metrics = {"samples": 8}
    wrong_round = info["upload"].replace(f"/rounds/{info['round']}/", "/rounds/99/")
    client._upload(wrong_round, 99, sent_global, metrics)  # 409 round_closed: refused
    assert client.error_feedback.residual == {}
    client._upload(info["upload"], info["round"], sent_global, metrics)  # 201: accepted
    residual = client.error_feedback.residual
    assert set(residual) == set(client.spec.global_tensors())
    assert any(bool(t.abs().sum() > 0) for t in residual.values())
