"""SIGKILL the server mid-round; a restart on the same state dir loses no accepted upload."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from edgetune.client.transport import ServerClient, ServerError
from edgetune.strategies.aggregation import ClientUpdate, fedadapter

from .conftest import JOIN_TOKEN, ApiClient, random_update, small_spec, wait_for_round

SETTINGS = [
    "server.min_clients=3",
    "server.tick_s=0.05",
    "seed=11",
    "rounds=1000",
    "server.beta=0.5",
    "server.eta=0.9",
    "server.project_conflicts=true",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcServer:
    """``python -m edgetune.server`` as a child process."""

    def __init__(self, state: Path, tmp: Path) -> None:
        self.state, self.tmp = state, tmp
        token_file = tmp / "join-token"
        token_file.write_text(JOIN_TOKEN + "\n")
        self.token_file = token_file
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [
            sys.executable,
            "-m",
            "edgetune.server",
            "--state",
            str(self.state),
            "--port",
            str(self.port),
        ]
        args += ["--join-token-file", str(self.token_file)]
        for s in SETTINGS:
            args += ["--set", s]
        self.log = open(self.tmp / f"server-{self.port}.log", "wb")  # noqa: SIM115
        env = {**os.environ, "EDGETUNE_JOIN_TOKEN": ""}
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.tmp / f"server-{self.port}.log").read_text()
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("server did not come up")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.log.close()
        assert self.proc.returncode == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


def _payloads(clients: list[ApiClient]) -> list[tuple[bytes, ClientUpdate]]:
    out = []
    for i, (c, n) in enumerate(zip(clients, (12, 7, 30))):
        tensors = random_update(c.spec, seed=500 + i)
        out.append(
            (
                c.encode(tensors, 1, n, loss=0.1 * i),
                ClientUpdate(c.client_id, c.spec.family, n, tensors),
            )
        )
    return out


def _run(srv: ProcServer, kill_after_two: bool) -> dict[str, dict[str, torch.Tensor]]:
    srv.start()
    specs = [small_spec("fam-a"), small_spec("fam-a"), small_spec("fam-b", d_model=12, n_layers=4)]
    clients = [ApiClient(srv.url, s) for s in specs]
    payloads = _payloads(clients)
    for c, (body, _) in zip(clients[:2], payloads[:2]):
        assert c.put(1, body).status_code == 201
    if kill_after_two:
        srv.kill()
        srv.start()
        for c in clients:
            c.http.close()
            c.http = httpx.Client(base_url=srv.url, timeout=30)
        info = clients[2].round()
        assert info["round"] == 1 and info["state"] == "collecting" and info["received"] == 2
        status = httpx.get(f"{srv.url}/v1/status", headers=ApiClient.auth(JOIN_TOKEN)).json()
        assert status["rounds"][0]["participants"] == sorted(c.client_id for c in clients[:2])
        assert clients[0].put(1, payloads[0][0]).status_code == 200  # still there: identical retry
    assert clients[2].put(1, payloads[2][0]).status_code == 201
    wait_for_round(clients[0], 2)
    result = {"global": clients[0].download("global"), "fam-a": clients[0].download("family")}
    result["fam-b"] = clients[2].download("family")
    _check_against_pure(result, payloads, clients)
    for c in clients:
        c.close()
    srv.stop()
    return result


def _check_against_pure(result, payloads, clients) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    order = sorted(range(3), key=lambda i: hashlib.sha256(payloads[i][0]).hexdigest())
    glob0 = {k: torch.zeros_like(v) for k, v in result["global"].items()}
    expected = fedadapter(
        glob0,
        [payloads[i][1] for i in order],
        beta=0.5,
        eta=0.9,
        project=True,
        seed=11 * 1_000_003 + 1,
    )
    for k, v in expected.global_params.items():
        assert torch.equal(result["global"][k], v), k


@pytest.mark.timeout(180)
def test_sigkill_after_two_of_three_uploads_then_restart(tmp_path: Path) -> None:
    killed = ProcServer(tmp_path / "killed", tmp_path)
    clean = ProcServer(tmp_path / "clean", tmp_path)
    try:
        after_kill = _run(killed, kill_after_two=True)
        uninterrupted = _run(clean, kill_after_two=False)
    finally:
        killed.stop()
        clean.stop()
    for name in ("global", "fam-a", "fam-b"):
        assert after_kill[name].keys() == uninterrupted[name].keys()
        for k in after_kill[name]:
            assert torch.equal(after_kill[name][k], uninterrupted[name][k]), (name, k)
    assert any(float(v.abs().sum()) > 0 for v in after_kill["global"].values())


@pytest.mark.timeout(120)
def test_tls_with_certfile_and_keyfile(tmp_path: Path) -> None:
    """`--certfile/--keyfile` serve HTTPS (self-signed cert made with the openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    port = free_port()
    env = {**os.environ, "EDGETUNE_JOIN_TOKEN": JOIN_TOKEN}
    args = [
        sys.executable,
        "-m",
        "edgetune.server",
        "--state",
        str(tmp_path / "s"),
        "--port",
        str(port),
        "--set",
        "server.min_clients=2",
    ]
    args += ["--certfile", str(cert), "--keyfile", str(key)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctx = ssl.create_default_context(cafile=str(cert))
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None and time.time() < deadline
            try:
                r = httpx.get(f"https://127.0.0.1:{port}/v1/health", verify=ctx, timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert r.status_code == 200
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2)
        # the client runtime's transport trusts the server through `client.ca_cert`
        trusting = ServerClient(f"https://127.0.0.1:{port}", verify=str(cert), retries=0)
        assert trusting.health()["status"] == "ok"
        with pytest.raises(ServerError):  # a self-signed server is not trusted by default
            ServerClient(f"https://127.0.0.1:{port}", retries=0).health()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)


def test_a_bad_tls_key_is_one_line(tmp_path: Path) -> None:
    """Defect 8: TLS start-up with a bad key printed a traceback."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    env = {**os.environ, "EDGETUNE_JOIN_TOKEN": JOIN_TOKEN}
    args = [sys.executable, "-m", "edgetune.server", "--state", str(tmp_path / "s")]
    args += ["--set", "server.min_clients=2", "--certfile", str(bad), "--keyfile", str(bad)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "TLS certificate" in proc.stderr


def _burst(clients: list[ApiClient], seed: int) -> list[tuple[int, str]]:
    """Every client uploads for the round it sees, concurrently; (round, client) acknowledged."""

    def one(client: ApiClient) -> tuple[int, str] | None:
        try:
            round_id = client.round()["round"]
            body = client.encode(random_update(client.spec, seed * 100 + round_id), round_id, 5)
            answer = client.put(round_id, body)
        except (httpx.TransportError, AssertionError):  # the server died under us
            return None
        return (round_id, client.client_id) if answer.status_code in (200, 201) else None

    with ThreadPoolExecutor(len(clients)) as pool:
        return [ack for ack in pool.map(one, clients) if ack is not None]


def test_chaos_sigkills_during_upload_bursts_lose_and_double_count_nothing(tmp_path: Path) -> None:
    """10 SIGKILLs at random moments of upload bursts and round closes: every acknowledged
    upload is in the state after the restarts, none is counted twice, and rounds go on."""
    rng = random.Random(7)
    srv = ProcServer(tmp_path / "state", tmp_path)
    srv.start()
    clients = [ApiClient(srv.url, small_spec("fam-a")) for _ in range(4)]
    acked: set[tuple[int, str]] = set()
    results: list[list[tuple[int, str]]] = []
    for kill in range(10):
        worker = threading.Thread(target=lambda k=kill: results.append(_burst(clients, k)))
        worker.start()
        time.sleep(rng.uniform(0.0, 0.4))
        srv.kill()
        worker.join(timeout=60)
        srv.start()
        for client in clients:
            client.http.close()
            client.http = httpx.Client(base_url=srv.url, timeout=30)
    for acks in results:
        acked.update(acks)
    status = httpx.get(f"{srv.url}/v1/status", headers=ApiClient.auth(JOIN_TOKEN)).json()
    stored = [(r["round"], c) for r in status["rounds"] for c in r["participants"]]
    assert len(stored) == len(set(stored))  # nothing counted twice
    assert acked <= set(stored), f"lost acknowledged uploads: {sorted(acked - set(stored))}"
    assert acked, "no upload was acknowledged: the kills came too early to test anything"
    last = clients[0].round()["round"]
    for client in clients:  # and the federation still works after all that
        body = client.encode(random_update(client.spec, 9999), last, 5)
        assert client.put(last, body).status_code in (200, 201, 409)
    wait_for_round(clients[0], last + 1, timeout=30)
    for client in clients:
        client.close()
    srv.stop()
