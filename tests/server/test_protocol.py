"""The shared wire contract: spec -> tensor schema, payload encoding, strict header parsing."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from edgetune.protocol import (
    AdapterSpec,
    ProtocolError,
    UpdateMeta,
    anchor_layers,
    decode_payload,
    encode_update,
    initial_tensors,
    parse_header,
)


def minilm_spec(**kw: object) -> AdapterSpec:
    base = dict(
        family="minilm-l6", fingerprint="sha256-abc", d_model=384, n_layers=6, rank=16, n_classes=4
    )
    base.update(kw)
    return AdapterSpec(**base)  # type: ignore[arg-type]


def test_anchor_layers() -> None:
    assert anchor_layers(6, 2) == [2, 5]
    assert anchor_layers(3, 2) == [1, 2]  # round_half_up(1.5) - 1 = 1
    assert anchor_layers(12, 3) == [3, 7, 11]
    with pytest.raises(ValueError, match=r"n_anchors=3 must be in 1\.\.n_layers=2"):
        anchor_layers(2, 3)
    with pytest.raises(ProtocolError, match="n_anchors=3"):  # a spec names the code too
        minilm_spec(n_layers=2, n_anchors=3)


def test_spec_schema_names_and_shapes() -> None:
    spec = minilm_spec()
    up = spec.upload_tensors()
    assert up["global.anchor1.C"].shape == (16, 16) and up["global.anchor2.q"].shape == (16,)
    assert up["family.layer0.D"].shape == (384, 16) and up["family.layer5.U"].shape == (16, 384)
    assert up["family.layer2.alpha_logits"].shape == (3,)  # anchor layer: global+family+private
    assert up["family.layer0.alpha_logits"].shape == (2,)
    assert up["family.head.weight"].shape == (4, 384)
    assert not any(n.startswith("private.") for n in up)
    assert len(spec.private_tensors()) == 12
    # the global part is identical for a family of a different width and depth
    other = minilm_spec(family="bert-wide", d_model=768, n_layers=12)
    assert {n: t.shape for n, t in other.global_tensors().items()} == {
        n: t.shape for n, t in spec.global_tensors().items()
    }
    tok = minilm_spec(gate="token").upload_tensors()
    assert tok["family.layer5.W_alpha"].shape == (16, 3)


def test_spec_roundtrip_and_validation() -> None:
    spec = minilm_spec()
    assert AdapterSpec.from_json(spec.to_json()) == spec
    assert AdapterSpec.from_json(spec.to_json()).spec_hash == spec.spec_hash
    with pytest.raises(ProtocolError, match="unknown spec fields"):
        AdapterSpec.from_dict({**spec.to_dict(), "bogus": 1})
    with pytest.raises(ProtocolError, match="rank"):
        minilm_spec(rank=0)
    with pytest.raises(ProtocolError, match="family"):
        minilm_spec(family="Bad Name!")
    lora = AdapterSpec(
        family="f",
        fingerprint="x",
        d_model=8,
        n_layers=1,
        rank=2,
        kind="lora",
        lora_modules=(("q", 8, 8),),
    )
    assert set(lora.upload_tensors()) == {"lora.q.A", "lora.q.B"}
    assert lora.family_key() == AdapterSpec.from_dict({**lora.to_dict(), "rank": 4}).family_key()


def test_update_roundtrip() -> None:
    spec = minilm_spec(n_layers=2, d_model=8, rank=4, n_classes=0)
    g, f = initial_tensors(spec, seed=1)
    data = encode_update({**g, **f}, spec, round_id=3, num_samples=10, metrics={"loss": 0.5})
    payload = decode_payload(data)
    meta = UpdateMeta.from_metadata(payload.metadata)
    assert meta.round_id == 3 and meta.num_samples == 10 and meta.metrics == {"loss": 0.5}
    assert meta.spec_hash == spec.spec_hash
    assert set(payload.tensors) == set(spec.upload_tensors())
    assert torch.equal(payload.tensors["family.layer0.D"], f["family.layer0.D"])
    _g2, f2 = initial_tensors(spec, seed=1)
    assert torch.equal(f2["family.layer1.D"], f["family.layer1.D"])  # deterministic init
    assert f["family.layer0.U"].abs().sum() == 0


def _raw(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize(
    ("blob", "code"),
    [
        (b"abc", "not_safetensors"),
        (struct.pack("<Q", 1 << 60) + b"{}", "header_too_large"),
        (struct.pack("<Q", 100) + b"{}", "truncated_payload"),
        (struct.pack("<Q", 2) + b"[]", "not_safetensors"),
        (struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000, "not_safetensors"),
        (
            _raw({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"1234"),
            "truncated_payload",
        ),
        (
            _raw({"x": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"12345678"),
            "bad_dtype",
        ),
        (
            _raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"12345678"),
            "bad_offsets",
        ),
        (
            _raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"12345678"),
            "bad_offsets",
        ),
    ],
)
def test_parse_header_rejects(blob: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_header(blob)
    assert info.value.code == code


def test_wire_names_are_built_and_read_in_one_place() -> None:
    from edgetune.protocol import (
        family_name,
        global_name,
        group_of,
        head_name,
        in_group,
        lora_factor,
        lora_name,
        private_name,
    )

    assert (
        global_name(2, "C") == "global.anchor2.C" and family_name(5, "b_U") == "family.layer5.b_U"
    )
    assert private_name(0, "q") == "private.layer0.q" and head_name("bias") == "family.head.bias"
    assert lora_name("encoder.layer.0.attention.self.query", "B").endswith("query.B")
    assert lora_factor(lora_name("encoder.layer.0.query", "A")) == ("encoder.layer.0.query", "A")
    for not_a_factor in ("lora.A", "lora.m.C", "family.layer0.D", "global.anchor1.q"):
        assert lora_factor(not_a_factor) is None
    assert group_of("family.head.weight") == "head" and in_group("family.head.weight", "family")
    assert not in_group("family.layer0.D", "head")
    spec = minilm_spec()  # the spec's schema uses the same builders
    assert set(spec.global_tensors()) == {global_name(k, leaf) for k in (1, 2) for leaf in "Cq"}


# -- the client card (class names sent at registration) ------------------------------------------
def _card(**kw: object) -> dict[str, object]:
    return {"version": 1, "family": "minilm-l6", "classes": ["arts", "law", "food", "war"], **kw}


def test_card_roundtrip_and_spec_check() -> None:
    from edgetune.protocol import ClientCard

    card = ClientCard.from_dict(_card())
    assert card.classes == ("arts", "law", "food", "war")
    assert ClientCard.from_json(card.to_json()) == card and card.to_dict() == _card()
    card.check_spec(minilm_spec())  # 4 names for a head of 4 classes: fine
    with pytest.raises(ProtocolError, match=r"4 class names for a head of 3 classes"):
        card.check_spec(minilm_spec(n_classes=3))
    with pytest.raises(ProtocolError, match=r"card family 'minilm-l6' != spec family 'other'"):
        card.check_spec(minilm_spec(family="other"))
    ClientCard.from_dict(_card(classes=[])).check_spec(minilm_spec(n_classes=0))  # lm task
    pinned = ClientCard.from_dict(_card(classes=["arts", "law", "food", "wars"]))
    assert card.disagreement(card) is None
    assert "classes[3] is 'war', pinned 'wars'" in (card.disagreement(pinned) or "")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_card(version=2), "card version 2 is not supported"),
        ({"family": "minilm-l6", "classes": []}, "card version None is not supported"),
        (_card(version=True), "card version True"),
        (_card(extra=1), r"unknown card fields: \['extra'\]"),
        (_card(classes="arts"), "card classes must be a list"),
        (_card(classes=["arts", 3]), r"classes\[1\]=3 must be a printable string"),
        (_card(classes=["arts", ""]), r"classes\[1\]='' must be a printable"),
        (_card(classes=["a\nb"]), r"classes\[0\]='a\\nb' must be a printable"),
        (_card(classes=["x" * 129]), "of 1..128 characters"),
        (_card(classes=[str(i) for i in range(4097)]), "lists 4097 classes; at most 4096"),
        (_card(classes=["arts", "law", "arts"]), "'arts' is listed twice"),
        (_card(family=""), "card family='' must be a non-empty string"),
        ([1, 2], "card must be a JSON object"),
    ],
)
def test_bad_cards_are_refused_by_name(data: object, message: str) -> None:
    from edgetune.protocol import ClientCard

    with pytest.raises(ProtocolError, match=message) as info:
        ClientCard.from_dict(data)
    assert info.value.code == "bad_card" and "\n" not in info.value.message


def test_the_server_checks_cards_and_pins_the_first_per_family(live_server) -> None:  # type: ignore[no-untyped-def]
    """Over HTTP: a malformed card or one that does not fit the spec is a 422 ``bad_card``;
    a second client of the family with other class names is a 409 ``classes_mismatch``, and
    the family keeps taking clients that agree (or send no card)."""
    import httpx

    from .conftest import JOIN_TOKEN, small_spec

    srv = live_server(min_clients=5)
    spec = small_spec()  # family fam-a, 3 classes
    http = httpx.Client(base_url=srv.url, timeout=30)

    def register(card: object, **extra: object) -> httpx.Response:
        body = {"spec": spec.to_dict(), "tier": "fp32", "card": card, **extra}
        return http.post(
            "/v1/register", json=body, headers={"Authorization": f"Bearer {JOIN_TOKEN}"}
        )

    good = {"version": 1, "family": "fam-a", "classes": ["ant", "bee", "cat"]}
    for card, needle in [
        ({**good, "classes": ["ant", "bee"]}, "2 class names for a head of 3 classes"),
        ({**good, "family": "fam-b"}, "card family 'fam-b' != spec family 'fam-a'"),
        ({**good, "version": 7}, "card version 7 is not supported"),
        ({**good, "classes": ["ant", "bee", "c\x00t"]}, r"classes[2]='c\x00t' must be"),
        ("not an object", "card: Input should be an object"),
    ]:
        answer = register(card)
        assert answer.status_code == 422, answer.text
        assert needle in answer.json()["detail"] and "\n" not in answer.json()["detail"]
    assert srv.storage.families() == []  # nothing was pinned by a refused registration
    assert register(good).status_code == 201
    other = register({**good, "classes": ["ant", "cat", "bee"]})
    assert other.status_code == 409 and other.json()["error"] == "classes_mismatch"
    assert "classes[1] is 'cat', pinned 'bee'" in other.json()["detail"]
    assert register(good).status_code == 201 and register(None).status_code == 201
    assert json.loads(srv.storage.family_card("fam-a") or "{}")["classes"] == good["classes"]
    http.close()
