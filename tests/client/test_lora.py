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


def test_a_lora_adapter_saved_in_peft_format_loads_in_peft(tmp_path):
    """PEFT's own loader reads our saved LoRA and computes what our model computes (atol 1e-5:
    the same fp32 products in another module order)."""
    peft = pytest.importorskip("peft")
    from edgetune.adapters.peft_format import HEAD_FILE, save_peft_adapter
    from edgetune.models.zoo import load_backbone

    backbone = load_backbone("tiny-bert-d32-l2")
    ours_model = copy.deepcopy(backbone.model)
    handle = apply_lora(ours_model, backbone.spec, LoraConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for tensor in handle.trainable_parameters():
            tensor.normal_(0.0, 0.2)
    folder = save_peft_adapter(handle, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(backbone.model), str(folder)).eval()
    tokens = backbone.tokenizer(["Federated learning.", "A short one."], padding=True,
                                return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        ours = ours_model(**tokens).last_hidden_state
        theirs = loaded(**tokens).last_hidden_state
        base = backbone.model(**tokens).last_hidden_state
    assert (ours - base).abs().max() > 1e-2  # the factors matter
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert not (folder / HEAD_FILE).exists()  # no head was attached to this handle


def test_folded_flora_updates_are_not_written_as_peft(tmp_path):
    from edgetune.adapters.peft_format import save_peft_adapter
    from edgetune.models.zoo import load_backbone

    backbone = load_backbone("tiny-bert-d32-l2")
    handle = apply_lora(copy.deepcopy(backbone.model), backbone.spec, LoraConfig(rank=2))
    module = next(iter(handle.lora_modules.values()))
    module.merged = torch.zeros(module.base.out_features, module.base.in_features)
    with pytest.raises(ConfigError, match="PEFT's LoRA format cannot carry them"):
        save_peft_adapter(handle, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
