"""Fixtures for server tests: small specs, a real uvicorn server on 127.0.0.1, an HTTP client."""

from __future__ import annotations

import hashlib
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn

from edgetune.config import RunConfig, ServerConfig
from edgetune.protocol import AdapterSpec, decode_payload, encode_update
from edgetune.server.app import create_app
from edgetune.server.connections import with_header_deadline
from edgetune.server.rounds import Coordinator
from edgetune.server.storage import Storage

JOIN_TOKEN = "test-join-token-0123456789abcdef"


def small_spec(
    family: str = "fam-a", d_model: int = 8, n_layers: int = 3, **kw: Any
) -> AdapterSpec:
    base: dict[str, Any] = dict(
        family=family, fingerprint=f"fp-{family}", d_model=d_model, n_layers=n_layers
    )
    base.update(rank=4, n_anchors=2, n_classes=3)
    base.update(kw)
    return AdapterSpec(**base)


def random_update(spec: AdapterSpec, seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Deterministic fake training result: global deltas + family values."""
    gen = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(t.shape, generator=gen) * scale for n, t in spec.upload_tensors().items()
    }


TOP_LEVEL = ("strategy", "seed", "rounds", "groups")


def server_run(**keys: Any) -> RunConfig:
    """A run config from the keys a test names: ``strategy``, ``seed``, ``rounds``, ``groups`` are
    top-level, every other key is a ``[server]`` key. Tests run up to 1000 rounds and, unless
    they say otherwise, close a round at 2 uploads."""
    top = {k: keys.pop(k) for k in TOP_LEVEL if k in keys}
    server = ServerConfig(**{"min_clients": 2, **keys})
    return RunConfig(**{"rounds": 1000, **top}, server=server)


class LiveServer:
    """A real uvicorn server in a thread, bound to a free port on 127.0.0.1."""

    def __init__(self, state: Path, **cfg: Any) -> None:
        self.run = server_run(**{"tick_s": 0.05, "sqlite_synchronous": "NORMAL", **cfg})
        self.config = self.run.server
        self.storage = Storage(state, synchronous=self.config.sqlite_synchronous)
        self.coord = Coordinator(self.run, self.storage, JOIN_TOKEN)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        uv = uvicorn.Config(
            create_app(self.coord),
            log_level="warning",
            access_log=False,
            lifespan="on",
            http=with_header_deadline(self.config.header_timeout_s),
        )
        self.server = uvicorn.Server(uv)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.storage.close()


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[Any]:
    servers: list[LiveServer] = []

    def start(state: Path | None = None, **cfg: Any) -> LiveServer:
        srv = LiveServer(state or tmp_path / "state", **cfg)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


class ApiClient:
    """What a client runtime does over HTTP, in a few lines."""

    def __init__(
        self, url: str, spec: AdapterSpec, tier: str = "fp32", join_token: str = JOIN_TOKEN
    ) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)
        self.spec = spec
        r = self.http.post(
            "/v1/register",
            json={"spec": spec.to_dict(), "tier": tier},
            headers=self.auth(join_token),
        )
        assert r.status_code == 201, r.text
        body = r.json()
        self.client_id, self.token = body["client_id"], body["token"]

    @staticmethod
    def auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    @property
    def headers(self) -> dict[str, str]:
        return self.auth(self.token)

    def round(self) -> dict[str, Any]:
        r = self.http.get("/v1/rounds/current", headers=self.headers)
        assert r.status_code == 200, r.text
        return r.json()

    def download(self, what: str) -> dict[str, torch.Tensor]:
        path = "/v1/global" if what == "global" else f"/v1/families/{self.spec.family}"
        r = self.http.get(path, headers=self.headers)
        assert r.status_code == 200, r.text
        return decode_payload(r.content).tensors

    def encode(
        self, tensors: dict[str, torch.Tensor], round_id: int, n: int, **metrics: float
    ) -> bytes:
        return encode_update(tensors, self.spec, round_id, n, metrics)

    def put(
        self, round_id: int, body: bytes, client_id: str | None = None, **kw: Any
    ) -> httpx.Response:
        headers = kw.pop("headers", self.headers)
        return self.http.put(f"/v1/rounds/{round_id}/updates/{client_id or self.client_id}", content=body,
                             headers=headers, **kw)  # fmt: skip

    def close(self) -> None:
        self.http.close()


def wait_for_round(client: ApiClient, round_id: int, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = client.round()
        if info["round"] >= round_id:
            return info
        time.sleep(0.02)
    raise AssertionError(f"round {round_id} did not open within {timeout}s")


def state_fingerprint(state: Path) -> dict[str, str]:
    """Hash of the logical DB content (``iterdump``) plus every file except SQLite's WAL/SHM.

    The -wal/-shm files change with reads and checkpoints without any logical change, so the
    database is compared by a full SQL dump through a separate connection instead.
    """
    out: dict[str, str] = {}
    conn = sqlite3.connect(f"file:{state / 'server.sqlite3'}?mode=ro", uri=True)
    try:
        out["db-dump"] = hashlib.sha256("\n".join(conn.iterdump()).encode()).hexdigest()
    finally:
        conn.close()
    for p in sorted(state.rglob("*")):
        if p.is_file() and not p.name.startswith("server.sqlite3"):
            out[str(p.relative_to(state))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
