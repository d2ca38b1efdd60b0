"""End-to-end rounds over HTTP against a real uvicorn server with a real SQLite file."""

from __future__ import annotations

import time
from importlib import metadata
from pathlib import Path

import httpx
import torch

from edgetune.protocol import decode_payload
from edgetune.strategies.aggregation import ClientUpdate, fedadapter

from .conftest import JOIN_TOKEN, ApiClient, random_update, small_spec, wait_for_round


def test_three_clients_two_families_two_rounds(live_server, tmp_path: Path) -> None:
    srv = live_server(min_clients=3, beta=0.5, eta=0.8, project_conflicts=True, seed=3)
    spec_a, spec_b = (
        small_spec("fam-a", d_model=8, n_layers=3),
        small_spec("fam-b", d_model=12, n_layers=5),
    )
    clients = [
        ApiClient(srv.url, spec_a, "fp32"),
        ApiClient(srv.url, spec_a, "nf4"),
        ApiClient(srv.url, spec_b),
    ]
    samples = [10, 30, 25]
    glob = clients[0].download("global")
    assert all(float(t.abs().sum()) == 0 for t in glob.values())  # C = q = 0 at init
    fam_init = [c.download("family") for c in clients]
    assert torch.equal(fam_init[0]["family.layer0.D"], fam_init[1]["family.layer0.D"])  # same start
    for round_id in (1, 2):
        info = clients[0].round()
        assert info["round"] == round_id and info["accepting"]
        assert info["downloads"] == {"family": "/v1/families/fam-a", "global": "/v1/global"}
        glob = clients[0].download("global")
        updates = []
        for i, (c, n) in enumerate(zip(clients, samples)):
            tensors = random_update(c.spec, seed=100 * round_id + i)
            r = c.put(round_id, c.encode(tensors, round_id, n, loss=1.0 / (i + 1)))
            assert r.status_code == 201, r.text
            updates.append(ClientUpdate(c.client_id, c.spec.family, n, tensors))
        wait_for_round(clients[0], round_id + 1)
        # the server's global branch equals the pure function on the same inputs
        order = sorted(range(3), key=lambda i: r_sha(clients[i], round_id, srv))
        expected = fedadapter(
            glob,
            [updates[i] for i in order],
            beta=0.5,
            eta=0.8,
            project=True,
            seed=3 * 1_000_003 + round_id,
        )
        got = clients[2].download("global")
        for k, v in expected.global_params.items():
            assert torch.equal(got[k], v), k
        fam_b = clients[2].download("family")
        for k, v in expected.families["fam-b"].items():
            assert torch.equal(fam_b[k], v), k
    # every version stays downloadable: ?version=N is the model as of round N
    r = clients[0].http.get("/v1/global", params={"version": 1}, headers=clients[0].headers)
    assert r.headers["X-EdgeTune-Version"] == "1"
    r = clients[0].http.get("/v1/families/fam-a", params={"version": 0}, headers=clients[0].headers)
    assert torch.equal(
        decode_payload(r.content).tensors["family.layer0.D"], fam_init[0]["family.layer0.D"]
    )
    r = clients[0].http.get("/v1/families/nope", headers=clients[0].headers)
    assert r.status_code == 403 and r.json()["error"] == "forbidden"  # not its family
    status = httpx.get(f"{srv.url}/v1/status", headers=ApiClient.auth(JOIN_TOKEN)).json()
    assert [r["state"] for r in status["rounds"]] == ["closed", "closed", "open"]
    assert (
        status["rounds"][0]["families"] == ["fam-a", "fam-b"]
        and len(status["rounds"][0]["participants"]) == 3
    )
    assert status["bytes_in"] > 0 and status["bytes_out"] > 0 and status["uploads"] == 6
    assert status["metrics"]["fam-a"]["1"]["nf4"]["loss"] == 0.5
    for c in clients:
        c.close()


def r_sha(client: ApiClient, round_id: int, srv) -> str:  # type: ignore[no-untyped-def]
    rec = srv.storage.update_of(round_id, client.client_id)
    return rec.sha256


def test_late_upload_gets_409_with_current_round(live_server) -> None:
    srv = live_server(min_clients=1)
    spec = small_spec()
    a, b = ApiClient(srv.url, spec), ApiClient(srv.url, spec)
    assert a.put(1, a.encode(random_update(spec, 1), 1, 5)).status_code == 201
    wait_for_round(a, 2)
    late = b.put(1, b.encode(random_update(spec, 2), 1, 5))
    assert late.status_code == 409
    assert late.json()["error"] == "round_closed" and late.json()["current_round"] == 2
    # an identical retry of an accepted upload after the round closed is still a 200 no-op
    again = a.put(1, a.encode(random_update(spec, 1), 1, 5))
    assert again.status_code == 200 and again.json()["status"] == "duplicate"


def test_deadline_closes_with_min_clients_at_deadline(live_server) -> None:
    srv = live_server(min_clients=3, min_clients_at_deadline=1, round_timeout_s=0.5)
    spec = small_spec()
    a = ApiClient(srv.url, spec)
    assert a.put(1, a.encode(random_update(spec, 1), 1, 5)).status_code == 201
    info = wait_for_round(a, 2, timeout=10)
    assert info["state"] == "open"
    assert srv.storage.rounds()[0].state == "closed"


def test_deadline_extends_then_abandons(live_server) -> None:
    srv = live_server(
        min_clients=2, min_clients_at_deadline=2, round_timeout_s=0.3, max_extensions=1
    )
    spec = small_spec()
    a = ApiClient(srv.url, spec)
    assert a.put(1, a.encode(random_update(spec, 1), 1, 5)).status_code == 201
    info = wait_for_round(a, 2, timeout=10)
    first = srv.storage.rounds()[0]
    assert first.state == "abandoned" and first.extensions == 1
    assert info["global_version"] == 0  # nothing aggregated
    late = a.put(1, a.encode(random_update(spec, 1), 1, 5))
    assert late.status_code == 200  # identical retry


def test_abandon_policy(live_server) -> None:
    srv = live_server(min_clients=2, round_timeout_s=0.2, on_deadline="abandon", rounds=1)
    a = ApiClient(srv.url, small_spec())
    deadline = time.time() + 10
    while srv.storage.rounds()[0].state != "abandoned":
        assert time.time() < deadline
        time.sleep(0.02)
    info = a.round()
    assert info["finished"] and info["round"] == 1  # max_rounds=1: no further round


def test_health_openapi_and_register_errors(live_server) -> None:
    srv = live_server()
    health = httpx.get(f"{srv.url}/v1/health").json()
    assert health["status"] == "ok" and health["version"] == metadata.version("edgetune")
    schema = httpx.get(f"{srv.url}/v1/openapi.json").json()
    assert schema["info"]["version"] == health["version"]
    assert list(schema["paths"]) == [
        "/v1/health",
        "/v1/register",
        "/v1/rounds/current",
        "/v1/global",
        "/v1/families/{family}",
        "/v1/rounds/{round_id}/updates/{client_id}",
        "/v1/clients/{client_id}",
        "/v1/status",
    ]
    spec = small_spec()
    r = httpx.post(
        f"{srv.url}/v1/register",
        json={"spec": spec.to_dict()},
        headers=ApiClient.auth("wrong-token"),
    )
    assert r.status_code == 401 and r.json()["error"] == "invalid_join_token"
    ApiClient(srv.url, spec)
    clash = small_spec(d_model=16)  # same family name, different shapes
    r = httpx.post(
        f"{srv.url}/v1/register", json={"spec": clash.to_dict()}, headers=ApiClient.auth(JOIN_TOKEN)
    )
    assert r.status_code == 409 and r.json()["error"] == "spec_mismatch"
    other_rank = small_spec("fam-z", rank=8)  # global branch is r x r: rank is shared by all
    r = httpx.post(
        f"{srv.url}/v1/register",
        json={"spec": other_rank.to_dict()},
        headers=ApiClient.auth(JOIN_TOKEN),
    )
    assert r.status_code == 409 and r.json()["error"] == "global_mismatch"
    bad = {**spec.to_dict(), "rank": -1}
    r = httpx.post(f"{srv.url}/v1/register", json={"spec": bad}, headers=ApiClient.auth(JOIN_TOKEN))
    assert r.status_code == 422 and "rank" in r.json()["detail"]
    r = httpx.get(f"{srv.url}/v1/status")
    assert r.status_code == 401 and r.json()["error"] == "missing_token"
    join = {**ApiClient.auth(JOIN_TOKEN), "Content-Type": "application/json"}
    r = httpx.post(f"{srv.url}/v1/register", content=b"{" + b" " * (2 << 20) + b"}", headers=join)
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
    r = httpx.post(f"{srv.url}/v1/register", content=b"[" * 100_000, headers=join)
    assert r.status_code == 422 and r.json()["error"] == "bad_request"
    body_schema = schema["paths"]["/v1/register"]["post"]["requestBody"]["content"]
    assert set(body_schema["application/json"]["schema"]["properties"]) == {"spec", "tier", "card"}


def test_lora_hetlora_over_http(live_server) -> None:
    srv = live_server(strategy="hetlora", min_clients=2)
    base = dict(family="lm", fingerprint="fp", d_model=8, n_layers=1, kind="lora", n_classes=0)
    s4 = small_spec(**base, rank=4, lora_modules=(("q", 8, 6),))
    s2 = small_spec(**base, rank=2, lora_modules=(("q", 8, 6),))
    a, b = ApiClient(srv.url, s4), ApiClient(srv.url, s2)
    assert b.download("family")["lora.q.A"].shape == (2, 8)
    ta, tb = random_update(s4, 1), random_update(s2, 2)
    assert a.put(1, a.encode(ta, 1, 1)).status_code == 201
    assert b.put(1, b.encode(tb, 1, 3)).status_code == 201
    wait_for_round(a, 2)
    got_b = b.download("family")
    expected_row0 = 0.25 * ta["lora.q.A"][0] + 0.75 * tb["lora.q.A"][0]
    assert got_b["lora.q.A"].shape == (2, 8)
    torch.testing.assert_close(got_b["lora.q.A"][0], expected_row0)
    torch.testing.assert_close(a.download("family")["lora.q.A"][3], 0.25 * ta["lora.q.A"][3])


def test_a_round_whose_closing_keeps_failing_is_abandoned_with_the_error(live_server) -> None:
    """A round that cannot be closed (here: aggregation raising on every tick) must not hang
    the clients: after MAX_STEP_FAILURES ticks it is abandoned, the error recorded, and the
    next round opens."""
    srv = live_server(min_clients=1)

    def broken(round_id: int) -> None:
        raise OSError(f"stored model of round {round_id} is unreadable")

    srv.coord._aggregate_and_close = broken  # this coordinator instance only
    client = ApiClient(srv.url, small_spec("fam-a"))
    tensors = random_update(client.spec, seed=1)
    assert client.put(1, client.encode(tensors, 1, 5)).status_code == 201
    info = wait_for_round(client, 2)
    assert info["round"] == 2 and info["accepting"]
    status = httpx.get(f"{srv.url}/v1/status", headers=ApiClient.auth(JOIN_TOKEN)).json()
    first = status["rounds"][0]
    assert first["state"] == "abandoned" and "unreadable" in first["summary"]["error"]
