"""int8 uploads and partial (global-only) uploads over real HTTP: accepted, validated, aggregated."""

from __future__ import annotations

import pytest
import torch

from edgetune.client.transport import ServerClient
from edgetune.measure import CLIENT_METRICS, profile_backbone
from edgetune.protocol import (
    SCALE_SUFFIX,
    AdapterSpec,
    ErrorFeedback,
    UpdateMeta,
    compress_update,
    decompress_tensors,
    encode_update,
    initial_tensors,
)

from .conftest import JOIN_TOKEN, ApiClient, random_update, small_spec, wait_for_round


def _body(c: ApiClient, tensors: dict, round_id: int, n: int, **kw) -> bytes:
    return encode_update(tensors, c.spec, round_id, n, {"loss": 0.5}, **kw)


def test_int8_and_global_only_uploads_aggregate_correctly(live_server) -> None:
    srv = live_server(min_clients=2, beta=1.0, eta=1.0, seed=0)
    spec = small_spec("fam-a", d_model=8, n_layers=3)
    a, b = ApiClient(srv.url, spec, "fp32"), ApiClient(srv.url, spec, "int8")
    ef = ErrorFeedback()
    glob0, fam0 = a.download("global"), a.download("family")
    n_a, n_b = 10, 30
    # round 1: A sends everything as int8 (with error feedback), B the global branch only
    full_a = random_update(spec, seed=1)
    wire_a, tag = compress_update(full_a, ef)
    assert a.put(1, _body(a, wire_a, 1, n_a, compression=tag)).status_code == 201
    glob_b = {k: v for k, v in random_update(spec, seed=2).items() if k.startswith("global.")}
    r = b.put(1, _body(b, glob_b, 1, n_b, bundles=("global",)))
    assert r.status_code == 201, r.text
    wait_for_round(a, 2)
    sent_a = decompress_tensors(wire_a, "int8")
    glob1, fam1 = a.download("global"), a.download("family")
    for k in glob0:
        want = glob0[k].double() + (n_a * sent_a[k].double() + n_b * glob_b[k].double()) / 40
        assert torch.allclose(glob1[k].double(), want, atol=1e-6), k
    for k in fam0:  # the family bundle came from A alone: A's dequantized values
        assert torch.equal(fam1[k], sent_a[k]), k
    # round 2: both send the global branch only; the family model is left as it was
    for c, seed in ((a, 3), (b, 4)):
        g = {k: v for k, v in random_update(spec, seed).items() if k.startswith("global.")}
        wire, tag = compress_update(g, ef)
        r = c.put(2, _body(c, wire, 2, 5, compression=tag, bundles=("global",)))
        assert r.status_code == 201, r.text
    wait_for_round(a, 3)
    fam2 = a.download("family")
    assert all(torch.equal(fam2[k], fam1[k]) for k in fam1)
    assert any(not torch.equal(a.download("global")[k], glob1[k]) for k in glob1)


def _int8_of(spec: AdapterSpec, bundles: tuple[str, ...] | None = None) -> dict:
    tensors = {k: v for k, v in random_update(spec, 7).items() if k in spec.upload_tensors(bundles)}
    return compress_update(tensors, None)[0]


def _nan_scale(w: dict) -> None:
    w["global.anchor1.C" + SCALE_SUFFIX] = torch.tensor([float("nan")])


def _bad_shape(w: dict) -> None:
    w["family.layer0.D"] = torch.zeros(3, 3, dtype=torch.int8)


def _float_in_int8(w: dict) -> None:
    w["family.layer0.b_D"] = w["family.layer0.b_D"].float()


def _no_scale(w: dict) -> None:
    del w["family.layer0.U" + SCALE_SUFFIX]


def _inf_scale(w: dict) -> None:
    w["family.head.bias" + SCALE_SUFFIX] = torch.tensor([float("inf")])


@pytest.mark.parametrize(
    ("mutate", "status", "code"),
    [
        (_nan_scale, 422, "non_finite"),
        (_inf_scale, 422, "non_finite"),
        (_bad_shape, 422, "shape_mismatch"),
        (_float_in_int8, 422, "bad_dtype"),
        (_no_scale, 422, "missing_tensors"),
    ],
)
def test_bad_int8_uploads_are_rejected(live_server, mutate, status: int, code: str) -> None:
    srv = live_server(min_clients=5)
    spec = small_spec("fam-a")
    c = ApiClient(srv.url, spec)
    wire = _int8_of(spec)
    mutate(wire)
    r = c.put(1, _body(c, wire, 1, 5, compression="int8"))
    assert r.status_code == status, r.text
    assert r.json()["error"] == code


def test_partial_upload_rules(live_server) -> None:
    srv = live_server(min_clients=5)
    spec = small_spec("fam-a")
    c = ApiClient(srv.url, spec)
    # a global-only upload that also holds a family tensor
    extra = {k: v for k, v in random_update(spec, 1).items() if k.startswith("global.")}
    extra["family.layer0.b_D"] = torch.zeros(spec.rank)
    r = c.put(1, _body(c, extra, 1, 5, bundles=("global",)))
    assert r.status_code == 422 and r.json()["error"] == "unexpected_tensors"
    # a float upload declaring int8
    floats = {k: v for k, v in random_update(spec, 1).items()}
    r = c.put(1, _body(c, floats, 1, 5, compression="int8"))
    assert r.status_code == 422 and r.json()["error"] == "missing_tensors"


def test_lora_has_no_global_bundle(live_server) -> None:
    srv = live_server(min_clients=5, strategy="fedavg-lora")
    spec = small_spec("fam-l", kind="lora", lora_modules=(("l0.query", 8, 8),), n_anchors=2)
    c = ApiClient(srv.url, spec)
    tensors = random_update(spec, 1)
    r = c.put(1, _body(c, tensors, 1, 5, bundles=("global",)))
    assert r.status_code == 422 and r.json()["error"] == "bad_bundles"
    wire = compress_update(tensors, ErrorFeedback())[0]
    assert c.put(1, _body(c, wire, 1, 5, compression="int8")).status_code == 201


def _spec_of() -> AdapterSpec:
    from edgetune.config import AdapterConfig, LoraConfig
    from edgetune.measure import build_setup
    from edgetune.models.zoo import load_backbone

    setup = build_setup(load_backbone("tiny-bert-d32-l2"), "fedadapter", 3, AdapterConfig(rank=4),
                        LoraConfig())  # fmt: skip
    assert setup.spec is not None
    return setup.spec


def test_bytes_match_what_the_client_sends_and_receives(live_server) -> None:
    """Profile's upload/download sizes == the bodies ServerClient actually PUTs and GETs."""
    srv = live_server(min_clients=5)
    for compression in ("none", "int8"):
        prof = profile_backbone(
            "tiny-bert-d32-l2", adapter="fedadapter", batch=2, seq=8, rank=4, n_classes=3,
            timing=False, compression=compression, family_every=2,
        )  # fmt: skip
        client = ServerClient(srv.url, retries=0)
        spec = _spec_of()
        client.register(JOIN_TOKEN, spec, "fp32")
        info = client.current_round()
        down0 = client.bytes_down
        client.download(info["downloads"]["family"])
        family_down = client.bytes_down - down0
        client.download(info["downloads"]["global"])
        assert family_down == prof["bytes"]["download"]["family"]
        assert client.bytes_down - down0 - family_down == prof["bytes"]["download"]["global"]
        glob, fam = initial_tensors(spec, seed=0)
        _upload(client, info["upload"], {**glob, **fam}, spec, compression)
        assert client.bytes_up == prof["bytes"]["upload"]["full"]
        other = ServerClient(srv.url, retries=0)
        other.register(JOIN_TOKEN, spec, "int8")
        path = other.current_round()["upload"]
        _upload(other, path, glob, spec, compression, bundles=("global",))
        assert other.bytes_up == prof["bytes"]["upload"]["global_only"]
        wire = prof["bytes"]
        assert (
            wire["upload_per_round"] == (wire["upload"]["full"] + wire["upload"]["global_only"]) / 2
        )
        client.close()
        other.close()


def _upload(
    client: ServerClient, path: str, tensors: dict, spec, compression: str, bundles=None
) -> None:
    from edgetune.protocol import ErrorFeedback, compress_update

    wire, tag = compress_update(tensors, ErrorFeedback() if compression != "none" else None,
                                compression)  # fmt: skip
    meta = UpdateMeta(spec.family, 1, spec.spec_hash, spec.fingerprint,
                      int(CLIENT_METRICS["samples"]), compression=tag,
                      metrics=dict(CLIENT_METRICS), bundles=bundles)  # fmt: skip
    client.upload(path, wire, meta)
