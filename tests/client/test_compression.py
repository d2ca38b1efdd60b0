"""int8 compression with error feedback, the family-bundle period and their wire metadata."""

from __future__ import annotations

import pytest
import torch

from edgetune.errors import ConfigError
from edgetune.protocol import (
    SCALE_SUFFIX,
    AdapterSpec,
    ErrorFeedback,
    ProtocolError,
    UpdateMeta,
    bundles_to_send,
    compress_update,
    decode_payload,
    decompress_tensors,
    dequantize_int8,
    encode_update,
    family_due,
    quantize_int8,
    select_bundles,
    wire_group,
)


def _spec(kind: str = "fedadapter") -> AdapterSpec:
    extra = {"lora_modules": (("l0.query", 8, 8),)} if kind == "lora" else {}
    return AdapterSpec("fam", "fp-fam", d_model=8, n_layers=2, rank=4, kind=kind, n_anchors=1,
                       n_classes=3, **extra)  # fmt: skip


@pytest.mark.parametrize("scale", [1e-4, 1.0, 300.0])
def test_int8_round_trip_error_is_at_most_half_a_step(scale: float) -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(64, 33, generator=gen) * scale
    q, s = quantize_int8(t)
    assert q.dtype == torch.int8 and s.shape == (1,) and s.dtype == torch.float32
    assert int(q.abs().max()) == 127
    err = (dequantize_int8(q, s) - t).abs()
    assert float(err.max()) <= float(s) / 2 * (1 + 1e-5)


def test_int8_zeros_and_non_finite() -> None:
    q, s = quantize_int8(torch.zeros(5))
    assert float(s) == 0.0 and not q.any()
    with pytest.raises(ProtocolError):
        quantize_int8(torch.tensor([1.0, float("nan")]))


def test_error_feedback_keeps_cumulative_sum_on_track() -> None:
    """Global deltas: sum(sent) = sum(true) - residual, the residual within half a step."""
    NAME = "global.anchor1.C"
    gen = torch.Generator().manual_seed(1)
    ef = ErrorFeedback()
    true_sum, sent_sum, plain_sum = torch.zeros(200), torch.zeros(200), torch.zeros(200)
    for _ in range(50):
        # a persistent small component the plain quantizer rounds away every time
        t = torch.randn(200, generator=gen) * 0.01 + 0.002
        t[0] = 1.0  # sets the scale: 1/127 per step, far above the 0.002 drift
        wire, tag = compress_update({NAME: t}, ef)
        assert tag == "int8"
        sent = decompress_tensors(wire, tag)[NAME]
        plain = decompress_tensors(compress_update({NAME: t}, None)[0], "int8")[NAME]
        true_sum, sent_sum, plain_sum = true_sum + t, sent_sum + sent, plain_sum + plain
        step = float(wire[NAME + SCALE_SUFFIX])
        assert torch.allclose(true_sum - sent_sum, ef.residual[NAME], atol=1e-5)
        assert float(ef.residual[NAME].abs().max()) <= step / 2 * (1 + 1e-4)
    assert float((true_sum - sent_sum).abs().max()) < 0.01
    assert float((true_sum - plain_sum).abs().max()) > 0.05  # without feedback it drifts


def test_family_values_are_quantized_afresh_without_feedback() -> None:
    """Family values are averaged, not accumulated: no residual is carried, error <= scale/2."""
    ef = ErrorFeedback()
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        t = torch.randn(64, generator=gen)
        wire, tag = compress_update({"family.layer0.U": t}, ef)
        sent = decompress_tensors(wire, tag)["family.layer0.U"]
        step = float(wire["family.layer0.U" + SCALE_SUFFIX])
        assert float((sent - t).abs().max()) <= step / 2 * (1 + 1e-4)
    assert ef.residual == {}


def test_error_feedback_state_round_trips() -> None:
    ef = ErrorFeedback()
    ef.compress({"a": torch.randn(4, 4)})
    other = ErrorFeedback()
    other.load_state_dict(ef.state_dict())
    assert torch.equal(other.residual["a"], ef.residual["a"])


def test_compress_update_none_and_bad_method() -> None:
    tensors = {"global.anchor1.q": torch.ones(4)}
    wire, tag = compress_update(tensors, ErrorFeedback(), "none")
    assert tag == "none" and wire == tensors
    with pytest.raises(ConfigError):
        compress_update(tensors, None, "zstd")


def test_family_due_and_bundles() -> None:
    assert [family_due(r, 3, final_round=7) for r in range(1, 8)] == [
        False, False, True, False, False, True, True,
    ]  # fmt: skip
    assert all(family_due(r, 1) for r in range(1, 5))
    with pytest.raises(ConfigError):
        family_due(1, 0)
    spec = _spec()
    assert bundles_to_send(spec, 1, 2, final_round=5) == ("global",)
    assert bundles_to_send(spec, 2, 2, final_round=5) is None
    assert bundles_to_send(_spec("lora"), 1, 2) is None  # LoRA has no separate global branch
    full = {n: torch.zeros(t.shape) for n, t in spec.upload_tensors().items()}
    only = select_bundles(full, spec, ("global",))
    assert set(only) == set(spec.global_tensors())
    assert wire_group("global.anchor1.C" + SCALE_SUFFIX) == "global"
    assert wire_group("family.head.weight") == "family"


def test_int8_update_metadata_round_trip() -> None:
    spec = _spec()
    tensors = {n: torch.randn(t.shape) for n, t in spec.upload_tensors(("global",)).items()}
    wire, tag = compress_update(tensors, ErrorFeedback())
    body = encode_update(wire, spec, 3, 10, {"loss": 0.5}, compression=tag, bundles=("global",))
    payload = decode_payload(body)
    meta = UpdateMeta.from_metadata(payload.metadata)
    assert meta.compression == "int8" and meta.bundles == ("global",)
    back = decompress_tensors(payload.tensors, meta.compression)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        step = float(payload.tensors[name + SCALE_SUFFIX])
        assert float((back[name] - t).abs().max()) <= step / 2 * (1 + 1e-5)


@pytest.mark.parametrize("bad", ["", "global,global", "private", "global,lora"])
def test_bad_bundles_metadata_is_rejected(bad: str) -> None:
    spec = _spec()
    md = UpdateMeta("fam", 1, spec.spec_hash, spec.fingerprint, 5).to_metadata()
    md["edgetune.protocol"] = "1"
    md["edgetune.bundles"] = bad
    with pytest.raises(ProtocolError) as err:
        UpdateMeta.from_metadata(md)
    assert err.value.code == "bad_bundles"


def test_int8_leaves_class_statistics_float32_and_exact():
    """Statistics are sums the server adds (a rounded count is a wrong count): int8 compression
    quantizes the adapter tensors and passes the ``stats.*`` tensors through unchanged."""
    from edgetune.protocol import ErrorFeedback, compress_update, decompress_tensors

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "global.anchor1.C": torch.randn(4, 4, generator=gen),
        "family.layer0.D": torch.randn(8, 4, generator=gen),
        "stats.own.counts": torch.tensor([3.0, 0.0, 17.0]),
        "stats.own.gram": torch.randn(10, generator=gen) * 1e4,
    }
    wire, method = compress_update(tensors, ErrorFeedback(), "int8")
    assert method == "int8"
    assert wire["global.anchor1.C"].dtype == torch.int8 and "family.layer0.D.__scale__" in wire
    assert not any(n.startswith("stats.") and n.endswith("__scale__") for n in wire)
    back = decompress_tensors(wire, method)
    for name in ("stats.own.counts", "stats.own.gram"):
        assert back[name].dtype == torch.float32 and torch.equal(back[name], tensors[name])


def test_training_updates_of_a_spec_with_statistics_leave_them_out():
    """A training round names its bundles (the spec's complete set includes ``stats``, which
    go up only in statistics rounds); an off-round of the family bundle sends the global one."""
    from edgetune.protocol import AdapterSpec, bundles_to_send

    spec = AdapterSpec("a", "fp", 8, 2, 4, n_classes=3, stats="own")
    assert bundles_to_send(spec, 2, every=1) == ("family", "global")
    assert bundles_to_send(spec, 3, every=2) == ("global",)
    plain = AdapterSpec("a", "fp", 8, 2, 4, n_classes=3)
    assert bundles_to_send(plain, 2, every=1) is None
