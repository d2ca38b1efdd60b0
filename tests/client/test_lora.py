"""LoRA in our framework equals PEFT's LoRA for the same weights."""

import copy

import pytest
import torch

from edgetune.adapters.lora import apply_lora
from edgetune.config import LoraConfig
from edgetune.errors import ConfigError


def test_lora_matches_peft_on_minilm_l6(minilm_l6):
    peft = pytest.importorskip("peft")
    tokens = minilm_l6.tokenizer(
        ["Federated learning on edge devices.", "A short one."], padding=True, return_tensors="pt"
    )
    ours_model = copy.deepcopy(minilm_l6.model)
    handle = apply_lora(ours_model, minilm_l6.spec, LoraConfig(rank=8, alpha=16.0))
    with torch.no_grad():  # B != 0, or both sides would equal the backbone trivially
        for tensor in handle.trainable_parameters():
            tensor.normal_(0.0, 0.05)
    peft_model = peft.get_peft_model(
        copy.deepcopy(minilm_l6.model),
        peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0),
    )
    with torch.no_grad():
        for path, module in handle.lora_modules.items():
            target = peft_model.base_model.model.get_submodule(path)
            target.lora_A["default"].weight.copy_(module.A)
            target.lora_B["default"].weight.copy_(module.B)
    peft_model.eval()
    with torch.no_grad():
        ours = ours_model(**tokens).last_hidden_state
        theirs = peft_model(**tokens).last_hidden_state
        base = minilm_l6.model(**tokens).last_hidden_state
    assert (ours - base).abs().max() > 1e-2  # the update is not negligible
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert len(handle.lora_modules) == 12  # query + value in 6 layers
    shapes = handle.module_shapes()
    assert shapes[0] == ("encoder.layer.0.attention.self.query", 384, 384)


def test_lora_errors():
    with pytest.raises(ConfigError, match="rank"):
        LoraConfig(rank=0)
    from edgetune.models.zoo import load_backbone

    backbone = load_backbone("tiny-bert-d32-l1")
    with pytest.raises(ConfigError, match="match no linear"):
        apply_lora(backbone.model, backbone.spec, LoraConfig(targets=("nonexistent",)))
