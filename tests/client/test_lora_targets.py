"""LoRA baselines pick their modules per architecture, as PEFT's per-model defaults do."""

import copy

import pytest
import torch

from edgetune.adapters.lora import DEFAULT_TARGETS, apply_lora
from edgetune.config import LoraConfig
from edgetune.errors import ConfigError
from edgetune.models.zoo import load_backbone


def test_defaults_are_peft_defaults():
    peft_constants = pytest.importorskip("peft.utils.constants")
    table = peft_constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    for architecture in ("bert", "llama", "gemma3_text"):
        assert list(DEFAULT_TARGETS[architecture]) == list(table[architecture]), architecture


@pytest.mark.parametrize(
    ("name", "leaves"),
    [
        ("tiny-bert-d32-l2", {"query", "value"}),
        ("tiny-llama-d32-l2", {"q_proj", "v_proj"}),
        ("tiny-gemma3-d32-l3", {"q_proj", "v_proj"}),
    ],
)
def test_default_targets_per_architecture(name, leaves):
    backbone = load_backbone(name)
    handle = apply_lora(backbone.model, backbone.spec, LoraConfig(rank=4))
    assert {p.rpartition(".")[2] for p in handle.lora_modules} == leaves
    assert len(handle.lora_modules) == 2 * backbone.spec.num_layers
    assert set(handle.config.targets) == leaves  # the handle (and its PEFT export) names them


def test_a_wrong_target_names_the_modules_that_exist():
    backbone = load_backbone("tiny-llama-d32-l1")
    with pytest.raises(ConfigError, match="match no linear") as err:
        apply_lora(backbone.model, backbone.spec, LoraConfig(targets=("query", "value")))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in str(err.value)


def test_default_llama_lora_matches_peft_default():
    """Same A and B: our default-target LoRA on a Llama computes what PEFT's
    `LoraConfig(target_modules=None)` computes on it."""
    peft = pytest.importorskip("peft")
    backbone = load_backbone("tiny-llama-d32-l2")
    ids = torch.randint(0, 1000, (2, 7))
    ours_model = copy.deepcopy(backbone.model)
    handle = apply_lora(ours_model, backbone.spec, LoraConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for tensor in handle.trainable_parameters():
            tensor.normal_(0.0, 0.2)
    peft_model = peft.get_peft_model(
        copy.deepcopy(backbone.model), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)
    )
    with torch.no_grad():
        for path, module in handle.lora_modules.items():
            target = peft_model.base_model.model.get_submodule(path)
            target.lora_A["default"].weight.copy_(module.A)
            target.lora_B["default"].weight.copy_(module.B)
        ours, theirs = ours_model(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits
        base = backbone.model(input_ids=ids).logits
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
