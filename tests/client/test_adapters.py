"""FedAdapter injection on real and tiny backbones: exactness at init, groups, freezing, I/O."""

import hashlib

import pytest
import torch

from edgetune.adapters.fedadapter import FedAdapterLayer, apply_fedadapter
from edgetune.config import AdapterConfig
from edgetune.errors import ConfigError
from edgetune.kernels import reference_adapter
from edgetune.models.heads import build_task_model
from edgetune.models.zoo import load_backbone

TINY = ["tiny-bert-d32-l3", "tiny-vit-d32-l3", "tiny-gpt2-d32-l3", "tiny-llama-d32-l3"]


def _inputs(backbone, batch=2, seq=7):
    if backbone.spec.modality == "image":
        return {"pixel_values": torch.randn(batch, 3, 32, 32)}
    ids = torch.randint(5, 1000, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, -2:] = 0  # a padded row exercises the mask
    return {"input_ids": ids, "attention_mask": mask}


def _output(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _randomise_adapters(handle, std=0.3):
    with torch.no_grad():
        for tensor in handle.trainable_parameters():
            tensor.normal_(0.0, std)


@pytest.mark.parametrize("name", TINY)
def test_init_is_exactly_the_backbone_and_nonzero_U_changes_it(name):
    backbone = load_backbone(name)
    inputs = _inputs(backbone)
    before = _output(backbone.model, inputs)
    handle = apply_fedadapter(backbone.model, backbone.spec, AdapterConfig(rank=8))
    assert torch.equal(_output(backbone.model, inputs), before)
    _randomise_adapters(handle)
    assert (_output(backbone.model, inputs) - before).abs().max() > 1e-3


def test_minilm_l3_init_exact(minilm_l3):
    inputs = _inputs(minilm_l3, seq=11)
    before = _output(minilm_l3.model, inputs)
    handle = apply_fedadapter(minilm_l3.model, minilm_l3.spec, AdapterConfig(rank=16))
    try:
        assert torch.equal(_output(minilm_l3.model, inputs), before)
    finally:
        handle.remove()
    assert torch.equal(_output(minilm_l3.model, inputs), before)


@pytest.mark.parametrize("gate", ["layer", "token"])
def test_layer_forward_matches_reference_composition(gate):
    torch.manual_seed(3)
    layer = FedAdapterLayer(
        24, AdapterConfig(rank=5, gate=gate, scale=0.7), ("global", "family", "private")
    )
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.5)
    x = torch.randn(2, 7, 24)
    residual = torch.randn(2, 7, 24)
    alpha = layer.mixing_weights(x)
    C = torch.stack([layer.C[b] for b in layer.branches])
    q = torch.stack([layer.q[b] for b in layer.branches])
    flat_alpha = alpha if gate == "layer" else alpha.reshape(14, -1)
    delta = reference_adapter(
        x.reshape(14, 24), layer.D, layer.b_D, C, q, flat_alpha, layer.U, layer.b_U, 0.7
    )
    expected = residual + delta.reshape(2, 7, 24)
    # fp32 throughout; the fused op folds the branches, so only the summation order differs.
    torch.testing.assert_close(layer(x, residual=residual), expected, rtol=1e-5, atol=1e-5)


def _hash_backbone(model, handle):
    adapter_ids = {id(t) for t in handle.trainable_parameters()}
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if id(tensor) not in adapter_ids:
            digest.update(name.encode() + tensor.detach().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("name", ["tiny-bert-d32-l4", "tiny-vit-d32-l3"])
def test_training_changes_every_adapter_tensor_and_no_backbone_tensor(name):
    backbone = load_backbone(name)
    task = build_task_model(backbone, "classify", n_classes=3)
    handle = apply_fedadapter(backbone.model, backbone.spec, AdapterConfig(rank=4), head=task.head)
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    adapter_ids = {id(t) for t in handle.trainable_parameters()}
    assert {id(p) for n, p in task.named_parameters() if n in trainable} == adapter_ids
    with torch.no_grad():  # as after a round: branches differ, else alpha gets no gradient
        for block, layer in handle.layers.items():
            layer.C["private"].normal_(0.0, 0.1, generator=torch.Generator().manual_seed(block))
    before_hash = _hash_backbone(task, handle)
    before = {n: t.detach().clone() for n, t in handle.named_tensors().items()}
    opt = torch.optim.Adam(handle.trainable_parameters(), lr=1e-2)
    inputs, labels = _inputs(backbone, batch=4), torch.tensor([0, 1, 2, 1])
    for _ in range(4):  # U=C=q=0 at init: the first step moves only U, b_U, q and the head
        opt.zero_grad()
        torch.nn.functional.cross_entropy(task(**inputs), labels).backward()
        opt.step()
    unchanged = [n for n, t in handle.named_tensors().items() if torch.equal(t, before[n])]
    assert unchanged == []
    assert {n.split(".")[0] for n in before} == {"global", "family", "private"}
    assert _hash_backbone(task, handle) == before_hash


def test_global_tensors_are_the_cross_model_contract(minilm_l6, minilm_l3):
    config = AdapterConfig(rank=16, n_anchors=2)
    handles = [apply_fedadapter(b.model, b.spec, config) for b in (minilm_l6, minilm_l3)]
    try:
        shapes = [
            {n: tuple(t.shape) for n, t in h.named_tensors("global").items()} for h in handles
        ]
        assert (
            shapes[0]
            == shapes[1]
            == {
                "global.anchor1.C": (16, 16),
                "global.anchor1.q": (16,),
                "global.anchor2.C": (16, 16),
                "global.anchor2.q": (16,),
            }
        )
        assert handles[0].anchors == [2, 5] and handles[1].anchors == [1, 2]  # round(k*L/K) - 1
        fam = [set(h.named_tensors("family")) for h in handles]
        assert "family.layer5.D" in fam[0] and "family.layer5.D" not in fam[1]
    finally:
        for h in handles:
            h.remove()


def test_remove_restores_the_module_tree():
    backbone = load_backbone("tiny-gpt2-d32-l2")
    tree = [(n, type(m), id(m)) for n, m in backbone.model.named_modules()]
    handle = apply_fedadapter(backbone.model, backbone.spec, AdapterConfig(rank=4))
    assert [(n, type(m), id(m)) for n, m in backbone.model.named_modules()] != tree
    handle.remove()
    assert [(n, type(m), id(m)) for n, m in backbone.model.named_modules()] == tree


def test_parameter_counts_per_group():
    backbone = load_backbone("tiny-bert-d32-l4")
    handle = apply_fedadapter(backbone.model, backbone.spec, AdapterConfig(rank=4, n_anchors=2))
    counts = handle.parameter_counts()
    d, r, L, K = 32, 4, 4, 2
    assert counts["global"] == K * (r * r + r)
    per_layer_family = d * r + r + r * r + r + r * d + d
    alpha = L * 2 + K  # 2 branches per layer, 3 at the anchors
    assert counts["family"] == L * per_layer_family + alpha
    assert counts["private"] == L * (r * r + r)
    assert counts["backbone"] == backbone.spec.num_params


def test_blocks_subset_and_anchor_alignment():
    backbone = load_backbone("tiny-bert-d32-l6")
    handle = apply_fedadapter(backbone.model, backbone.spec, AdapterConfig(rank=4, blocks="from:2"))
    assert sorted(handle.layers) == [2, 3, 4, 5] and handle.anchors == [3, 5]


def test_save_load_roundtrip_and_mismatch_errors(tmp_path):
    backbone = load_backbone("tiny-bert-d32-l2")
    config = AdapterConfig(rank=4, n_anchors=1)
    handle = apply_fedadapter(backbone.model, backbone.spec, config)
    _randomise_adapters(handle)
    path = tmp_path / "adapter.safetensors"
    handle.save(path)
    saved = {n: t.clone() for n, t in handle.state_dict_for("family").items()}
    other = load_backbone("tiny-bert-d32-l2")
    other_handle = apply_fedadapter(other.model, other.spec, config)
    other_handle.load(path)
    for name, tensor in other_handle.state_dict_for("family").items():
        assert torch.equal(tensor, saved[name])
    wrong_config = load_backbone("tiny-bert-d32-l2")
    with pytest.raises(ConfigError, match="adapter config"):
        apply_fedadapter(
            wrong_config.model, wrong_config.spec, AdapterConfig(rank=8, n_anchors=1)
        ).load(path)
    wrong_family = load_backbone("tiny-bert-d48-l2")
    with pytest.raises(ConfigError, match="family"):
        apply_fedadapter(wrong_family.model, wrong_family.spec, config).load(path)
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ConfigError, match="not a readable"):
        other_handle.load(tmp_path / "corrupt.safetensors")


def test_load_group_is_strict():
    backbone = load_backbone("tiny-bert-d32-l2")
    handle = apply_fedadapter(backbone.model, backbone.spec, AdapterConfig(rank=4, n_anchors=1))
    good = handle.state_dict_for("global")
    with pytest.raises(ConfigError, match="missing"):
        handle.load_group("global", {})
    bad_shape = {**good, "global.anchor1.C": torch.zeros(3, 3)}
    with pytest.raises(ConfigError, match="shape"):
        handle.load_group("global", bad_shape)
    with pytest.raises(ConfigError, match="NaN"):
        handle.load_group("global", {**good, "global.anchor1.q": torch.full((4,), float("nan"))})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 200}, "rank"),
        ({"branches": ("family", "nope")}, "branches"),
        ({"branches": ("private", "family")}, "order"),
        ({"gate": "head"}, "gate"),
        ({"scale": float("nan")}, "scale"),
        ({"dropout": 1.0}, "dropout"),
        ({"blocks": "some"}, "blocks"),
        ({"n_anchors": 0}, "n_anchors"),
    ],
)
def test_config_errors_name_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AdapterConfig(**kwargs)


def test_adapters_refuse_a_cnn():
    backbone = load_backbone("mobilenet-v2")
    with pytest.raises(ConfigError, match="transformer backbone"):
        apply_fedadapter(backbone.model, backbone.spec, AdapterConfig())


def test_clients_of_one_family_start_identical():
    config = AdapterConfig(rank=4)
    first, second = load_backbone("tiny-bert-d32-l2"), load_backbone("tiny-bert-d32-l2")
    torch.manual_seed(1)
    a = apply_fedadapter(first.model, first.spec, config).state_dict_for("family")
    torch.manual_seed(2)  # the global RNG state must not matter
    b = apply_fedadapter(second.model, second.spec, config).state_dict_for("family")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert a["family.layer0.D"].abs().sum() > 0
