"""Task models around a frozen backbone: sequence / image classification, causal LM.

The head is a plain `nn.Linear(hidden, n_classes)`; it is trained and aggregated within the
family (`family.head.*`). Text models are mean-pooled over the attention mask, as the sentence
embeddings of MiniLM are; image transformers are mean-pooled over patches; the CNN uses its
global-average-pooled features. Decoders run their base model only (`base_model`: the blocks
and the final norm), so classification never computes the LM head; the `lm` task returns the
final hidden states and leaves the (frozen, tied) LM head to the chunked loss of
`edgetune.client.lm`, which never holds a whole [tokens, vocab] logits tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edgetune.errors import ConfigError
from edgetune.models.zoo import Backbone


def _last_hidden(model: nn.Module, causal_lm: bool, **inputs: Tensor) -> Tensor:
    if causal_lm:  # *ForCausalLM: its base model (blocks + final norm); the LM head never runs
        return model.base_model(**inputs).last_hidden_state
    return model(**inputs).last_hidden_state


class SequenceClassifier(nn.Module):
    """logits = head(mean over unmasked tokens of the last hidden state)."""

    def __init__(self, backbone: Backbone, n_classes: int) -> None:
        super().__init__()
        self.body = backbone.model
        self.causal_lm = backbone.spec.causal_lm
        self.head = nn.Linear(backbone.spec.hidden_size, n_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = _last_hidden(
            self.body, self.causal_lm, input_ids=input_ids, attention_mask=attention_mask
        )
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled.to(self.head.weight.dtype))


class ImageClassifier(nn.Module):
    """logits = head(pooled image features)."""

    def __init__(self, backbone: Backbone, n_classes: int) -> None:
        super().__init__()
        self.body = backbone.model
        self.is_cnn = backbone.spec.architecture == "mobilenet_v2"
        self.head = nn.Linear(backbone.spec.hidden_size, n_classes)

    def forward(self, pixel_values: Tensor) -> Tensor:
        if self.is_cnn:
            pooled = self.body.pooled_features(pixel_values)
        else:
            pooled = self.body(pixel_values=pixel_values).last_hidden_state.mean(dim=1)
        return self.head(pooled.to(self.head.weight.dtype))


class CausalLM(nn.Module):
    """Causal language modelling with the backbone's own frozen LM head, no new head.

    `forward` returns the final hidden states [B, T, d]; `logits` applies the LM head (and
    Gemma's final soft-capping where the config sets one) to any slice of them.
    """

    is_lm = True

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        if not backbone.spec.causal_lm:
            raise ConfigError(f"task='lm' needs a decoder; {backbone.spec.name} is not a causal LM")
        self.body = backbone.model
        self.lm_head = backbone.model.get_output_embeddings()
        self.softcap = getattr(backbone.model.config, "final_logit_softcapping", None)
        self.head = None

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return _last_hidden(self.body, True, input_ids=input_ids, attention_mask=attention_mask)

    def logits(self, hidden: Tensor) -> Tensor:
        out = self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out


def build_task_model(backbone: Backbone, task: str, n_classes: int = 0) -> nn.Module:
    """`task`: "classify" (text or image, by the backbone's modality) or "lm"."""
    if task == "lm":
        return CausalLM(backbone)
    if task != "classify":
        raise ConfigError(f"task={task!r}: allowed values are 'classify' and 'lm'")
    if n_classes < 2:
        raise ConfigError(f"n_classes={n_classes}: a classifier needs at least 2 classes")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # every client of a family starts from the same head
        if backbone.spec.modality == "image":
            return ImageClassifier(backbone, n_classes)
        return SequenceClassifier(backbone, n_classes)
