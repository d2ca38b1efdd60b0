"""Model zoo: real offline weights, the MiniLM-L3 ONNX conversion, tiny configs, errors."""

import pytest
import torch

from edgetune.errors import ZooError
from edgetune.models.minilm_l3 import PARITY_ATOL, max_abs_diff_vs_onnxruntime
from edgetune.models.zoo import embed_texts, load_backbone, weights_fingerprint

PARAPHRASE_TRIPLES = [
    (
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The stock market crashed today.",
    ),
    (
        "The cat sleeps on the sofa.",
        "A kitten is napping on the couch.",
        "Interest rates rose again.",
    ),
    (
        "How do I reset my password?",
        "I forgot my password, how can I change it?",
        "The volcano erupted last night.",
    ),
]


@pytest.mark.parametrize("fixture", ["minilm_l6", "minilm_l3"])
def test_paraphrase_ranks_above_unrelated(fixture, request):
    backbone = request.getfixturevalue(fixture)
    for anchor, paraphrase, unrelated in PARAPHRASE_TRIPLES:
        emb = embed_texts(backbone, [anchor, paraphrase, unrelated])
        assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2, (fixture, anchor)


def test_converted_minilm_l3_matches_onnxruntime(minilm_l3):
    sentences = ["Federated fine-tuning on a Jetson.", "short", "A much longer sentence " * 8]
    diff = max_abs_diff_vs_onnxruntime(minilm_l3.model, minilm_l3.tokenizer, sentences)
    assert diff < PARITY_ATOL


@pytest.mark.parametrize(("fixture", "layers"), [("minilm_l6", 6), ("minilm_l3", 3)])
def test_minilm_spec(fixture, layers, request):
    spec = request.getfixturevalue(fixture).spec
    assert (spec.architecture, spec.hidden_size, spec.num_layers) == ("bert", 384, layers)
    assert spec.ffn_style == "bert_output"
    assert spec.ffn_paths == tuple(f"encoder.layer.{i}.output" for i in range(layers))
    assert len(spec.fingerprint) == 16


def test_backbone_is_frozen_and_in_eval(minilm_l6):
    assert not any(p.requires_grad for p in minilm_l6.model.parameters())
    assert not minilm_l6.model.training


def test_mobilenet_classifies_chelsea_as_cat():
    skimage_data = pytest.importorskip("skimage.data")
    from edgetune.models.mobilenet import IMAGENET_CAT_CLASSES

    backbone = load_backbone("mobilenet-v2")
    with torch.no_grad():
        probs = backbone.model(backbone.preprocess(skimage_data.chelsea())).softmax(-1)[0]
    assert int(probs.argmax()) in IMAGENET_CAT_CLASSES
    assert float(probs[list(IMAGENET_CAT_CLASSES)].sum()) > 0.5


@pytest.mark.parametrize(
    ("name", "arch", "width", "depth", "path0"),
    [
        ("tiny-bert", "bert", 64, 2, "encoder.layer.0.output"),
        ("tiny-vit-d48-l3", "vit", 48, 3, "layers.0.mlp"),
        ("tiny-gpt2-d32-l1", "gpt2", 32, 1, "transformer.h.0.mlp"),
        ("tiny-llama-d80-l5", "llama", 80, 5, "model.layers.0.mlp"),
    ],
)
def test_tiny_configs(name, arch, width, depth, path0):
    backbone = load_backbone(name)
    spec = backbone.spec
    assert (spec.architecture, spec.hidden_size, spec.num_layers) == (arch, width, depth)
    assert spec.ffn_paths[0] == path0 and len(spec.ffn_paths) == depth
    assert spec.family == f"tiny-{arch}-d{width}-l{depth}" or name == "tiny-bert"
    # Seeded: the same name gives the same weights, a different width different ones.
    assert load_backbone(name).spec.fingerprint == spec.fingerprint


def test_tiny_width_and_depth_keywords():
    backbone = load_backbone("tiny-bert", hidden_size=32, num_layers=3)
    assert (backbone.spec.hidden_size, backbone.spec.num_layers) == (32, 3)
    assert backbone.spec.family == "tiny-bert-d32-l3"


def test_fingerprint_tracks_content():
    model = load_backbone("tiny-bert-d32-l1").model
    before = weights_fingerprint(model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert weights_fingerprint(model) != before


def test_local_hf_folder_round_trip(tmp_path):
    backbone = load_backbone("tiny-gpt2-d32-l2")
    backbone.model.save_pretrained(tmp_path)
    backbone.tokenizer.save_pretrained(tmp_path)
    loaded = load_backbone(str(tmp_path))
    assert loaded.spec.fingerprint == backbone.spec.fingerprint
    assert loaded.spec.causal_lm and loaded.tokenizer is not None


@pytest.mark.parametrize(
    ("name", "message"),
    [("no-such-model", "unknown backbone"), ("tiny-bert-d30", "multiple of 16")],
)
def test_bad_names_raise_clear_errors(name, message):
    with pytest.raises(ZooError, match=message):
        load_backbone(name)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ZooError, match=r"no config\.json"):
        load_backbone(str(tmp_path))


def test_text_helper_rejects_image_model():
    with pytest.raises(ZooError, match="not a text model"):
        embed_texts(load_backbone("tiny-vit"), ["hello"])
