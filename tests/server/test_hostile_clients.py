"""Regression tests for what hostile clients did to the server (issue 16), over real HTTP."""

from __future__ import annotations

import hashlib
import math
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from edgetune.protocol import ProtocolError
from edgetune.server.storage import MAX_READERS
from edgetune.strategies.aggregation import ClientUpdate
from edgetune.strategies.base import GLOBAL, family_model
from edgetune.strategies.fedadapter import FedAdapterStrategy

from .conftest import JOIN_TOKEN, ApiClient, random_update, small_spec, wait_for_round


def _register(srv, spec_dict: dict) -> httpx.Response:
    return httpx.post(
        f"{srv.url}/v1/register",
        json={"spec": spec_dict, "tier": "x"},
        headers=ApiClient.auth(JOIN_TOKEN),
        timeout=30,
    )


def test_oversized_specs_are_refused_before_anything_is_allocated(live_server) -> None:
    """Defect 1 (a 16,000-layer spec pinned a model whose header broke every round close) and
    defect 5 (d_model = n_classes = 2^20 asked for a 4 TiB head): both are 422 now, fast, and
    the rounds of honest clients go on."""
    srv = live_server(min_clients=1)
    deep = small_spec(family="deep").to_dict() | {"n_layers": 16000}
    answer = _register(srv, deep)
    assert answer.status_code == 422 and "n_layers=16000" in answer.json()["detail"]
    wide = small_spec(family="wide", d_model=1 << 16, n_classes=1 << 20).to_dict()
    started = time.monotonic()
    answer = _register(srv, wide)
    assert answer.status_code == 422 and answer.json()["error"] == "spec_too_large"
    assert time.monotonic() - started < 5  # refused from the shapes, nothing materialised
    honest = ApiClient(srv.url, small_spec())
    body = honest.encode(random_update(honest.spec, 1), 1, 5)
    assert honest.put(1, body).status_code == 201
    wait_for_round(honest, 2)
    assert srv.storage.families() == ["fam-a"]


def test_spec_bounds_name_the_field() -> None:
    with pytest.raises(ProtocolError, match=r"d_model=70000 must be an int in 1\.\.65536"):
        small_spec(d_model=70000)
    spec = small_spec()
    values, header = spec.wire_cost()
    assert values == 4 * sum(math.prod(t.shape) for t in spec.upload_tensors().values())
    assert 0 < header < 100_000


def test_huge_finite_values_cannot_reach_the_global_model(live_server) -> None:
    """Defect 2: global deltas of 3e38 (each finite) made the global branch inf for good."""
    srv = live_server(min_clients=2)
    hostile, honest = ApiClient(srv.url, small_spec()), ApiClient(srv.url, small_spec())
    poison = {n: torch.full_like(t, 3e38) for n, t in random_update(hostile.spec, 1).items()}
    answer = hostile.put(1, hostile.encode(poison, 1, 5))
    assert answer.status_code == 422 and answer.json()["error"] == "value_too_large"
    for client, seed in ((hostile, 2), (honest, 3)):
        assert (
            client.put(1, client.encode(random_update(client.spec, seed), 1, 5)).status_code == 201
        )
    wait_for_round(honest, 2)
    for tensor in honest.download("global").values():
        assert bool(torch.isfinite(tensor).all())


def test_an_aggregate_that_overflows_is_not_committed() -> None:
    """The last line of defence: a merge that overflows float32 keeps the old state."""
    spec = small_spec()
    near_max = {n: torch.full(t.shape, 3e38) for n, t in spec.global_tensors().items()}
    state = {GLOBAL: near_max, family_model(spec.family): {}}
    update = ClientUpdate("c1", spec.family, 4, random_update(spec, 1, scale=1.0))
    update.tensors.update({n: torch.full(t.shape, 3e38) for n, t in spec.global_tensors().items()})
    result = FedAdapterStrategy().aggregate_round(1, state, [update], {"c1": spec})
    assert result.models == {} and "not finite" in result.summary["reason"]


@pytest.mark.parametrize(
    "path",
    ["/v1/rounds/9223372036854775808/updates/c-x", "/v1/global?version=9223372036854775808"],
)
def test_ids_beyond_sqlite_integers_are_a_422_not_a_500(live_server, path) -> None:
    """Defect 5: round ids or ?version= of 2^63 or more raised OverflowError (a plain 500)."""
    srv = live_server(min_clients=2)
    client = ApiClient(srv.url, small_spec())
    method = client.http.put if "/updates/" in path else client.http.get
    kwargs = {"content": b"x"} if "/updates/" in path else {}
    answer = method(path, headers=client.headers, **kwargs)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_reader_connections_are_bounded_whatever_the_threads(live_server) -> None:
    """Defect 3: a reader connection per worker thread, never closed, leaked descriptors as the
    thread pool replaced idle threads. Readers are pooled now: short-lived threads (the worst
    case of a churning pool) and bursts of concurrent GETs over HTTP leave at most
    MAX_READERS connections and a flat descriptor count."""
    srv = live_server(min_clients=2)
    client = ApiClient(srv.url, small_spec())
    for _ in range(40):  # 40 threads, one query each, then gone
        worker = threading.Thread(target=srv.storage.families)
        worker.start()
        worker.join()
    assert len(srv.storage._readers) <= MAX_READERS

    def burst() -> None:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda _: client.round(), range(32)))

    burst()
    settled, rss = _open_fds(), _rss_bytes()
    for _ in range(5):
        burst()
        time.sleep(0.2)  # idle between bursts
    assert _open_fds() - settled <= 8  # keep-alive sockets of the client may come and go
    # 160 requests; the allocator keeps some arenas, but no per-request or per-thread growth
    assert _rss_bytes() - rss < 32 * 2**20
    assert len(srv.storage._readers) <= MAX_READERS


def test_refused_uploads_leave_no_blob_behind(live_server) -> None:
    """Defect 4: 16 concurrent different uploads from one client: 1 accepted, 15 refused, and
    13 orphan blobs stayed on disk until a restart."""
    srv = live_server(min_clients=2)
    client = ApiClient(srv.url, small_spec())
    bodies = [client.encode(random_update(client.spec, seed), 1, 5) for seed in range(16)]
    with ThreadPoolExecutor(16) as pool:
        codes = sorted(pool.map(lambda body: client.put(1, body).status_code, bodies))
    assert codes == [201] + [409] * 15
    on_disk = {p.name.split(".", 1)[0] for p in srv.storage.blobs.root.glob("*.safetensors")}
    accepted = {u.sha256 for u in srv.storage.updates(1)}
    models = {hashlib.sha256(b).hexdigest() for b in bodies} & on_disk
    assert models == accepted and len(accepted) == 1


def test_registrations_are_rate_limited_and_families_capped(live_server) -> None:
    """Defect 6: join-token holders could register without limit and pin any number of
    families (each one slowing every round close)."""
    srv = live_server(min_clients=2, registrations_per_minute=3, max_families=1)
    for _ in range(2):
        ApiClient(srv.url, small_spec())
    answer = _register(srv, small_spec(family="fam-b").to_dict())
    assert answer.status_code == 422 and "server.max_families=1" in answer.json()["detail"]
    answer = _register(srv, small_spec().to_dict())  # a fourth attempt within the minute
    assert answer.status_code == 429 and answer.json()["error"] == "too_many_registrations"
    assert srv.storage.families() == ["fam-a"] and srv.storage.count_clients() == 2


def _stalled_upload(srv, client: ApiClient, declared: int) -> socket.socket:
    """A raw HTTP PUT that declares ``declared`` body bytes, sends 10 and stops."""
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    head = (
        f"PUT /v1/rounds/1/updates/{client.client_id} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {client.token}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + b"0123456789")
    return sock


def _read_reply(sock: socket.socket) -> str:
    """The whole response (headers and JSON body may arrive in separate packets)."""
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    sock.close()
    return data.decode(errors="replace")


def test_slow_bodies_time_out_and_concurrent_uploads_are_capped(live_server) -> None:
    """Defect 7: connections that declared large bodies and trickled them stayed open and held
    memory indefinitely."""
    srv = live_server(min_clients=2, body_timeout_s=1.0, max_concurrent_uploads=1)
    client = ApiClient(srv.url, small_spec())
    stalled = _stalled_upload(srv, client, 1_000_000)
    time.sleep(0.3)  # the stalled upload holds the only slot
    other = ApiClient(srv.url, small_spec())
    answer = other.put(1, other.encode(random_update(other.spec, 1), 1, 5))
    assert answer.status_code == 429 and answer.json()["error"] == "too_many_uploads"
    started = time.monotonic()
    reply = _read_reply(stalled)
    assert reply.startswith("HTTP/1.1 408") and "body_timeout" in reply
    assert time.monotonic() - started < 5
    answer = other.put(1, other.encode(random_update(other.spec, 1), 1, 5))
    assert answer.status_code == 201, answer.text  # the slot is free again


def test_a_client_reads_only_its_own_family(live_server) -> None:
    """Defect 8: any client token downloaded any family's model."""
    srv = live_server(min_clients=2)
    mine, other = ApiClient(srv.url, small_spec()), ApiClient(srv.url, small_spec(family="fam-b"))
    answer = mine.http.get("/v1/families/fam-b", headers=mine.headers)
    assert answer.status_code == 403 and "fam-a" in answer.json()["detail"]
    assert other.http.get("/v1/families/fam-b", headers=other.headers).status_code == 200


def test_huge_metrics_and_repeated_header_keys_are_refused(live_server) -> None:
    """Defect 8: a metric of 1e308 was stored as inf (shown as null); a safetensors header
    with a repeated key was accepted (which one counts is up to the parser)."""
    srv = live_server(min_clients=2)
    client = ApiClient(srv.url, small_spec())
    tensors = random_update(client.spec, 1)
    answer = client.put(1, client.encode(tensors, 1, 5, loss=1e308))
    assert answer.status_code == 422 and answer.json()["error"] == "bad_metrics"
    body = client.encode(tensors, 1, 5)
    size = int.from_bytes(body[:8], "little")
    header = body[8 : 8 + size].decode()
    name = next(iter(client.spec.upload_tensors()))
    entry = header[header.index(f'"{name}":') :].split("},", 1)[0] + "}"
    forged = header.replace(entry, entry + "," + entry, 1).encode()
    forged += b" " * (-len(forged) % 8)
    answer = client.put(1, len(forged).to_bytes(8, "little") + forged + body[8 + size :])
    assert answer.status_code == 400 and "repeats the keys" in answer.json()["detail"]
    assert srv.storage.count_updates(1) == 0


def test_tokens_can_be_revoked_and_expire(live_server) -> None:
    """Defect 8: client tokens never expired and could not be revoked."""
    srv = live_server(min_clients=2, token_ttl_s=1.0)
    client, other = ApiClient(srv.url, small_spec()), ApiClient(srv.url, small_spec())
    path = f"/v1/clients/{client.client_id}"
    answer = other.http.delete(path, headers=other.headers)  # a client token cannot revoke
    assert answer.status_code == 401 and answer.json()["error"] == "invalid_join_token"
    answer = client.http.delete(path, headers=ApiClient.auth(JOIN_TOKEN))
    assert answer.status_code == 200 and answer.json() == {"revoked": client.client_id}
    answer = client.http.get("/v1/rounds/current", headers=client.headers)
    assert answer.status_code == 401 and answer.json()["error"] == "token_revoked"
    unknown = client.http.delete("/v1/clients/c-none", headers=ApiClient.auth(JOIN_TOKEN))
    assert unknown.status_code == 404
    assert other.round()["round"] == 1  # the other token still works, until its ttl
    time.sleep(1.2)
    answer = other.http.get("/v1/rounds/current", headers=other.headers)
    assert answer.status_code == 401 and answer.json()["error"] == "token_expired"


def test_a_client_token_reads_a_status_that_names_no_other_client(live_server) -> None:
    """Defect 8: any client token read /v1/status with every client id."""
    srv = live_server(min_clients=2)
    mine, other = ApiClient(srv.url, small_spec()), ApiClient(srv.url, small_spec())
    for client, seed in ((mine, 1), (other, 2)):
        assert (
            client.put(1, client.encode(random_update(client.spec, seed), 1, 5)).status_code == 201
        )
    wait_for_round(mine, 2)
    seen = httpx.get(f"{srv.url}/v1/status", headers=mine.headers).json()["rounds"][0]
    assert seen["participants"] == [mine.client_id] and seen["participant_count"] == 2
    full = httpx.get(f"{srv.url}/v1/status", headers=ApiClient.auth(JOIN_TOKEN)).json()
    assert sorted(full["rounds"][0]["participants"]) == sorted([mine.client_id, other.client_id])


def test_request_heads_sent_a_byte_at_a_time_are_cut_off(live_server) -> None:
    """Defect 7: a client sending its headers a byte at a time held its connection open for
    as long as it liked (each byte reset the keep-alive timer)."""
    srv = live_server(min_clients=2, header_timeout_s=1.0)
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    started = time.monotonic()
    closed = False
    for byte in b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
        try:
            sock.sendall(bytes([byte]))
        except OSError:  # the server closed the connection
            closed = True
            break
        time.sleep(0.05)
    if not closed:
        closed = sock.recv(1024) == b""
    sock.close()
    assert closed and time.monotonic() - started < 5
    assert httpx.get(f"{srv.url}/v1/health", timeout=5).status_code == 200  # others unaffected
