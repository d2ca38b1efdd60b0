"""Quantized frozen backbones: accuracy vs fp32, training through 4-bit layers, probe fallback."""

import logging
from collections import Counter

import pytest
import torch

from edgetune.errors import ZooError
from edgetune.measure import memory as quant_memory
from edgetune.models import quant, weights
from edgetune.models.zoo import embed_texts, load_backbone, weights_fingerprint

SENTENCES = [
    "A man is eating food.",
    "The cat sleeps on the sofa.",
    "How do I reset my password?",
    "Federated fine-tuning of adapters on a Jetson board.",
    "The stock market crashed today.",
    "short",
    "Quantized transformers trade a little accuracy for a much smaller memory budget.",
    "Interest rates rose again.",
]
MIN_COSINE = {"int8": 0.99, "nf4": 0.95}


@pytest.fixture(scope="module")
def quantized() -> dict:
    return {mode: load_backbone("minilm-l6", quant=mode) for mode in MIN_COSINE}


@pytest.fixture
def fresh_probes():
    quant.clear_probe_cache()
    yield
    quant.clear_probe_cache()


@pytest.mark.parametrize("mode", list(MIN_COSINE))
def test_sentence_embeddings_stay_close_to_fp32(mode, quantized, minilm_l6):
    reference = embed_texts(minilm_l6, SENTENCES)
    cosines = (embed_texts(quantized[mode], SENTENCES) * reference).sum(-1)
    print(f"{mode}: min cosine {cosines.min():.4f}, mean {cosines.mean():.4f}")
    assert float(cosines.min()) >= MIN_COSINE[mode], cosines.tolist()


def test_quantized_tiers_share_the_fp32_family(quantized, minilm_l6):
    for mode, backbone in quantized.items():
        assert backbone.quant == mode and backbone.extras["quant"]["used"] == mode
        assert backbone.spec == minilm_l6.spec  # fingerprint of the unquantized weights
    assert minilm_l6.quant == "none"


def test_only_linears_are_quantized_and_all_is_frozen(quantized):
    import bitsandbytes as bnb

    model = quantized["nf4"].model
    swapped = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(swapped) == 6 * 6  # q, k, v, attention out, intermediate, output per block
    assert not [path for path, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert model.embeddings.word_embeddings.weight.dtype == torch.float32
    assert model.encoder.layer[0].output.LayerNorm.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


def test_weight_bytes_are_exact(quantized, minilm_l6):
    fp32 = weights.weight_bytes(minilm_l6.model)
    params = sum(p.numel() for p in minilm_l6.model.parameters())
    assert fp32["float32"] == 4 * params
    linear_weights = 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    assert weights.weight_bytes(quantized["int8"].model)["int8"] == linear_weights
    # nf4: two weights per byte plus one uint8 absmax per 64-block (double quantization).
    assert weights.weight_bytes(quantized["nf4"].model)["uint8"] == linear_weights // 2 + (
        linear_weights // 64
    )
    ratio = sum(weights.linear_weight_bytes(quantized["nf4"].model).values()) / sum(
        weights.linear_weight_bytes(minilm_l6.model).values()
    )
    assert ratio < 0.14


@pytest.fixture
def one_thread():
    """20 small steps: one intra-op thread is as fast and far steadier on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fedadapter_training_on_nf4_reduces_loss_and_keeps_backbone(one_thread):
    backbone = load_backbone("minilm-l6", quant="nf4")
    before = weights.backbone_tensor_hashes(backbone.model)
    # A no-grad eval forward first: bitsandbytes would repack 4-bit weights in place for its
    # CPU gemv here, and then fail on the first forward with grad (see quantize_linear).
    embed_texts(backbone, SENTENCES[:2])
    step, trainable = quant_memory.make_train_step(backbone, "fedadapter", batch_size=2, seq_len=12)
    losses = [step() for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0], losses
    after = weights.backbone_tensor_hashes(backbone.model, exclude=tuple(trainable))
    assert Counter(after) == Counter(before)  # every backbone tensor unchanged, bit for bit
    assert sum(p.numel() for p in trainable) > 10 * 4 * 385  # adapters, not just the head


def test_head_only_step_backpropagates_through_every_quantized_layer():
    backbone = load_backbone("tiny-bert-d64-l2", quant="nf4")
    step, _ = quant_memory.make_train_step(backbone, "head", batch_size=2, seq_len=8)
    grads = []
    for module in backbone.model.modules():
        if type(module).__name__ == "Linear4bit":
            module.register_full_backward_hook(lambda m, gi, go: grads.append(gi[0] is not None))
    step()
    assert len(grads) == 2 * 6 and all(grads)


def test_failing_probe_falls_back_with_one_log_line(caplog, fresh_probes):
    with caplog.at_level(logging.WARNING, logger="edgetune.models.quant"):
        used, probes = quant.resolve_quant("nf4", "nosuchdevice")
    assert used == "none" and [p.mode for p in probes] == ["nf4", "int8", "none"]
    records = [r for r in caplog.records if r.name == "edgetune.models.quant"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "quant='nf4'" in message and "'nosuchdevice'" in message
    assert "RuntimeError" in message and "falling back to quant='none'" in message


def test_strict_raises_with_the_reason(fresh_probes):
    with pytest.raises(ZooError, match=r"quant='fp4'.*nosuchdevice.*strict=True.*RuntimeError"):
        quant.resolve_quant("fp4", "nosuchdevice", strict=True)


def test_load_backbone_falls_back_to_int8(monkeypatch, caplog, fresh_probes):
    real = quant._run_probe

    def broken_4bit(mode, device, compute_dtype):
        if mode in ("nf4", "fp4"):
            raise RuntimeError("simulated: no 4-bit kernel for this GPU")
        return real(mode, device, compute_dtype)

    monkeypatch.setattr(quant, "_run_probe", broken_4bit)
    with caplog.at_level(logging.WARNING, logger="edgetune.models.quant"):
        backbone = load_backbone("tiny-bert", quant="nf4")
    assert backbone.quant == "int8" and backbone.extras["quant"]["requested"] == "nf4"
    assert "simulated: no 4-bit kernel" in caplog.text and "quant='int8'" in caplog.text
    with pytest.raises(ZooError, match="simulated: no 4-bit kernel"):
        load_backbone("tiny-bert", quant="nf4", strict=True)


def test_probe_runs_forward_and_backward_once_per_process(fresh_probes):
    first = quant.probe_quant("nf4", "cpu")
    assert first.ok and first.out_cosine > 0.99 and first.grad_cosine > 0.99
    assert quant.probe_quant("nf4", "cpu") is first


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quant": "nf8"}, "quant='nf8'"),
        ({"quant": "nf4", "compute_dtype": "float64"}, "compute_dtype='float64'"),
        ({"device": "nosuchdevice"}, "device='nosuchdevice'"),
        ({"quant": "nf4", "device": "cuda:99"}, "device='cuda:99' is not usable"),
    ],
)
def test_bad_options_raise_clear_errors(options, message):
    with pytest.raises(ZooError, match=message):
        load_backbone("tiny-bert", **options)


def test_fp4_and_bf16_compute_on_a_tiny_model():
    fp32 = load_backbone("tiny-bert")
    backbone = load_backbone("tiny-bert", quant="fp4", compute_dtype="bfloat16")
    assert backbone.quant == "fp4" and backbone.spec.fingerprint == fp32.spec.fingerprint
    assert weights_fingerprint(fp32.model) == fp32.spec.fingerprint
    cos = (embed_texts(backbone, SENTENCES[:3]) * embed_texts(fp32, SENTENCES[:3])).sum(-1)
    assert float(cos.min()) > 0.8


def test_mobilenet_has_nothing_to_quantize():
    with pytest.raises(ZooError, match="no linear layers"):
        load_backbone("mobilenet-v2", quant="int8")


def test_memory_table_lists_each_mode():
    table = weights.memory_table("tiny-bert-d64-l2")
    assert "float32 MB" in table and "uint8 MB" in table and "int8 MB" in table
    assert [line.split()[0] for line in table.splitlines()[2:5]] == ["none", "int8", "nf4"]


def test_step_memory_in_a_fresh_process():
    result = quant_memory.step_memory("tiny-bert-d64-l2", "nf4", batch_size=2, seq_len=8)
    assert result["quant"] == "nf4" and result["peak_source"] == "VmHWM"
    assert result["step_peak_rss"] >= result["rss_after_imports"] > 0
    assert result["weight_bytes"]["uint8"] > 0


def test_gpt2_conv1d_is_quantized_and_tied_head_stays_full_precision():
    fp32 = load_backbone("tiny-gpt2-d32-l2")
    backbone = load_backbone("tiny-gpt2-d32-l2", quant="nf4")
    model = backbone.model
    assert len(backbone.extras["quant"]["layers"]) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied, fp32
    ids = torch.randint(0, 30000, (2, 8))
    with torch.no_grad():
        a, b = fp32.model(input_ids=ids).logits, model(input_ids=ids).logits
    assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.95
