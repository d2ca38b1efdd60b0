"""Table-driven bad uploads: each gets its intended 4xx + JSON error, and state is untouched.

State identity is checked with ``state_fingerprint``: a SQL dump of the database through a
separate read-only connection (the -wal/-shm files change on reads and checkpoints without a
logical change, so they are not hashed byte-wise) plus the sha256 of every other file.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from edgetune.protocol import (
    META_COMPRESSION,
    META_METRICS,
    META_ROUND,
    META_SPEC_HASH,
    UpdateMeta,
    encode_payload,
)

from .conftest import ApiClient, random_update, small_spec, state_fingerprint


@dataclass
class Ctx:
    a: ApiClient  # fam-a, has an accepted upload in round 1
    b: ApiClient  # fam-a, nothing uploaded yet
    c: ApiClient  # fam-b
    good_a: bytes  # the accepted upload of a

    def tensors(self, seed: int = 7) -> dict[str, torch.Tensor]:
        return random_update(self.b.spec, seed)

    def meta(self, **changes: str) -> dict[str, str]:
        md = UpdateMeta(
            family="fam-a", round_id=1, spec_hash=self.b.spec.spec_hash, fingerprint=self.b.spec.fingerprint,
            num_samples=5,
        ).to_metadata()  # fmt: skip
        md.update(changes)
        return md

    def good(self) -> bytes:
        return self.b.encode(self.tensors(), 1, 5)


def _with(ctx: Ctx, fn: Callable[[dict[str, torch.Tensor]], None], **meta: str) -> bytes:
    t = ctx.tensors()
    fn(t)
    return encode_payload(t, ctx.meta(**meta))


def _nan(t: dict[str, torch.Tensor]) -> None:
    t["family.layer0.D"][0, 0] = float("nan")


def _inf(t: dict[str, torch.Tensor]) -> None:
    t["global.anchor1.C"][1, 1] = float("inf")


def _rename(t: dict[str, torch.Tensor]) -> None:
    t["family.layer0.Dx"] = t.pop("family.layer0.D")


def _extra(t: dict[str, torch.Tensor]) -> None:
    t["family.layer9.D"] = torch.zeros(8, 4)


def _private(t: dict[str, torch.Tensor]) -> None:
    t["private.layer0.C"] = torch.zeros(4, 4)


def _shape(t: dict[str, torch.Tensor]) -> None:
    t["family.layer1.U"] = torch.zeros(4, 9)


def _bf16(t: dict[str, torch.Tensor]) -> None:
    t["family.head.bias"] = t["family.head.bias"].bfloat16()


def _float64_payload(ctx: Ctx) -> bytes:
    return st_save({k: v.double() for k, v in ctx.tensors().items()}, metadata=ctx.meta())


def _send(
    ctx: Ctx, body: bytes, round_id: int = 1, who: str = "b", token: str | None = None, **kw
) -> object:  # type: ignore[no-untyped-def]
    client = {"a": ctx.a, "b": ctx.b, "c": ctx.c}[who]
    headers = kw.pop("headers", ApiClient.auth(token) if token is not None else client.headers)
    return client.put(round_id, body, headers=headers, **kw)


class _RawResponse:
    def __init__(self, raw: bytes) -> None:
        head, _, body = raw.partition(b"\r\n\r\n")
        self.status_code = int(head.split(b" ", 2)[1])
        self.text = body.decode()

    def json(self) -> dict:
        return json.loads(self.text)


def _declared_length_lie(ctx: Ctx) -> _RawResponse:
    """A request declaring a 10 GB body (sent over a raw socket: httpx refuses to lie)."""
    port = int(str(ctx.b.http.base_url).rsplit(":", 1)[1].strip("/"))
    head = (
        f"PUT /v1/rounds/1/updates/{ctx.b.client_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {ctx.b.token}\r\nContent-Length: 10000000000\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + ctx.good()[:100])
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return _RawResponse(b"".join(chunks))


CASES: list[tuple[str, Callable[[Ctx], object], int, str]] = [
    ("truncated body", lambda x: _send(x, x.good()[: len(x.good()) // 2]), 400, "truncated_payload"),
    ("truncated header", lambda x: _send(x, x.good()[:20]), 400, "truncated_payload"),
    ("non-safetensors bytes", lambda x: _send(x, struct.pack("<Q", 16) + b"this is not json"), 400, "not_safetensors"),
    ("zip bytes", lambda x: _send(x, b"PK\x03\x04 this is a zip file, not tensors"), 400, "header_too_large"),
    ("empty body", lambda x: _send(x, b""), 400, "not_safetensors"),
    ("huge declared header size", lambda x: _send(x, struct.pack("<Q", 1 << 62) + b"{}"), 400, "header_too_large"),
    ("renamed key", lambda x: _send(x, _with(x, _rename)), 422, "missing_tensors"),
    ("extra key", lambda x: _send(x, _with(x, _extra)), 422, "unexpected_tensors"),
    ("private tensor", lambda x: _send(x, _with(x, _private)), 422, "private_tensor"),
    ("wrong shape", lambda x: _send(x, _with(x, _shape)), 422, "shape_mismatch"),
    ("NaN", lambda x: _send(x, _with(x, _nan)), 422, "non_finite"),
    ("inf", lambda x: _send(x, _with(x, _inf)), 422, "non_finite"),
    ("float64 tensors", lambda x: _send(x, _float64_payload(x)), 422, "bad_dtype"),
    ("dtype differs from metadata", lambda x: _send(x, _with(x, _bf16)), 422, "bad_dtype"),
    ("wrong family", lambda x: _send(x, _with(x, lambda t: None, **{"edgetune.family": "fam-b"})), 422, "wrong_family"),
    ("spec hash mismatch", lambda x: _send(x, _with(x, lambda t: None, **{META_SPEC_HASH: "0" * 64})), 422, "spec_mismatch"),
    ("metadata round != URL", lambda x: _send(x, _with(x, lambda t: None, **{META_ROUND: "2"})), 422, "round_mismatch"),
    ("negative sample count", lambda x: _send(x, _with(x, lambda t: None, **{"edgetune.num_samples": "-5"})), 422, "bad_num_samples"),
    ("zero sample count", lambda x: _send(x, _with(x, lambda t: None, **{"edgetune.num_samples": "0"})), 422, "bad_num_samples"),
    ("absurd sample count", lambda x: _send(x, _with(x, lambda t: None, **{"edgetune.num_samples": "9" * 15})), 422, "bad_num_samples"),
    ("non-finite metric", lambda x: _send(x, _with(x, lambda t: None, **{META_METRICS: '{"loss": NaN}'})), 422, "bad_metrics"),
    ("compression", lambda x: _send(x, _with(x, lambda t: None, **{META_COMPRESSION: "zstd"})), 422, "unsupported_compression"),
    ("no metadata", lambda x: _send(x, st_save(x.tensors())), 422, "missing_metadata"),
    ("wrong round", lambda x: _send(x, x.b.encode(x.tensors(), 5, 5), round_id=5), 409, "round_closed"),
    ("different second upload", lambda x: _send(x, x.a.encode(random_update(x.a.spec, 99), 1, 5), who="a"), 409, "duplicate_upload"),
    ("missing token", lambda x: x.b.http.put(f"/v1/rounds/1/updates/{x.b.client_id}", content=x.good()), 401, "missing_token"),
    ("invalid token", lambda x: _send(x, x.good(), token="not-a-real-token"), 401, "invalid_token"),
    ("basic auth scheme", lambda x: _send(x, x.good(), token=None, headers={"Authorization": "Basic Zm9vOmJhcg=="}), 401, "missing_token"),
    ("foreign token", lambda x: _send(x, x.good(), token=x.c.token), 403, "forbidden"),
    ("oversize body", lambda x: _send(x, b"\0" * 300_000), 413, "payload_too_large"),
    ("oversize declared length", _declared_length_lie, 413, "payload_too_large"),
    ("non-integer round in URL", lambda x: x.b.http.put("/v1/rounds/one/updates/x", content=b"", headers=x.b.headers), 422, "bad_request"),
]  # fmt: skip


@pytest.fixture(scope="module")
def ctx_and_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from .conftest import LiveServer

    state: Path = tmp_path_factory.mktemp("bad") / "state"
    srv = LiveServer(state, min_clients=10, max_upload_bytes=256 * 1024)
    a, b = ApiClient(srv.url, small_spec("fam-a")), ApiClient(srv.url, small_spec("fam-a"))
    c = ApiClient(srv.url, small_spec("fam-b", d_model=12))
    good_a = a.encode(random_update(a.spec, 1), 1, 5)
    assert a.put(1, good_a).status_code == 201
    yield Ctx(a, b, c, good_a), srv, state
    for cl in (a, b, c):
        cl.close()
    srv.stop()


@pytest.mark.parametrize(("name", "send", "status", "code"), CASES, ids=[c[0] for c in CASES])
def test_bad_upload(ctx_and_server, name: str, send, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    ctx, _, state = ctx_and_server
    before = state_fingerprint(state)
    resp = send(ctx)
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == code, body
    assert isinstance(body["detail"], str) and body["detail"]
    assert state_fingerprint(state) == before, f"{name} changed the state"


def test_case_table_is_large_enough() -> None:
    assert len(CASES) >= 15


def test_identical_retry_is_ok_and_changes_nothing(ctx_and_server) -> None:  # type: ignore[no-untyped-def]
    ctx, srv, state = ctx_and_server
    before = state_fingerprint(state)
    resp = ctx.a.put(1, ctx.good_a)
    assert resp.status_code == 200 and resp.json()["status"] == "duplicate"
    assert state_fingerprint(state) == before
    assert srv.storage.count_updates(1) == 1


def test_a_valid_upload_does_change_state(ctx_and_server) -> None:  # type: ignore[no-untyped-def]
    """The fingerprint is sensitive: a real acceptance changes it (runs last in this module)."""
    ctx, _, state = ctx_and_server
    before = state_fingerprint(state)
    assert ctx.b.put(1, ctx.good()).status_code == 201
    assert state_fingerprint(state) != before
