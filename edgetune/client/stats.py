"""Class statistics of a client's training texts: what the server fits each family's head from.

With ``train.head = "stats"`` a client uploads, in each statistics round (round 1 and the final
round of a run of 3 or more), the statistics of the pooled features its head sees
(`edgetune.strategies.class_stats` has the math; the wire names are in `edgetune.protocol.names`):

- ``stats.own.*``: its model *as received* (before local training), so every client of a family
  measures the same model and the server's head follows the adapted features;
- ``stats.frozen.*`` (a device's first client, spec ``stats = "source"``): its frozen backbone,
  computed once at start-up while the adapter is still the identity (U = 0);
- ``stats.bridge.<b>.*``: for each other family b its device also runs, b's frozen Gram and the
  cross products of b's frozen features with its own current ones (b's frozen backbone is loaded
  once in fp32 for one pass over the texts, then dropped).

Cost per statistics round: one forward pass over the client's texts (no backward), instead of
the training epochs; bytes: float32, d (d + 1) / 2 per Gram (its upper triangle; MiniLM:
0.30 MB), K x d sums, K counts, d_b x d per bridge's cross products (MiniLM: 0.59 MB).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from edgetune.client.trainer import EncodedSplit
from edgetune.data.datasets import Split
from edgetune.models.heads import build_task_model
from edgetune.models.zoo import load_backbone
from edgetune.protocol import stats_bridge_name
from edgetune.strategies.class_stats import ClassStats, pack_symmetric

log = logging.getLogger(__name__)

#: Texts per forward pass while gathering features (no backward: memory is activations only).
FEATURE_BATCH = 64


@torch.no_grad()
def pooled_features(task: nn.Module, data: EncodedSplit) -> Tensor:
    """[n, d] float64: the pooled features ``task``'s head receives, in the split's order."""
    captured: list[Tensor] = []
    hook = task.head.register_forward_hook(lambda _m, args, _o: captured.append(args[0]))
    was_training = task.training
    task.eval()
    try:
        for index in torch.arange(len(data)).split(FEATURE_BATCH):
            task(**data.batch(index)[0])
    finally:
        hook.remove()
        task.train(was_training)
    return torch.cat(captured).to(torch.float64)


class StatsReporter:
    """One client's statistics: frozen parts measured once, its own model's every round."""

    def __init__(
        self,
        task: nn.Module,
        data: EncodedSplit,
        split: Split,
        n_classes: int,
        *,
        source: bool,
        bridges: Sequence[str] = (),
        max_length: int = 64,
    ) -> None:
        self.data, self.labels, self.n_classes = data, data.labels, n_classes
        self.frozen: dict[str, Tensor] = {}
        if source:  # called before any server tensor is loaded: the adapter is the identity
            x = pooled_features(task, data)
            self.frozen = ClassStats.of(x, self.labels, n_classes).to_wire("frozen")
        #: family -> (its frozen features [n, d_b] of our texts, their Gram as float32)
        self.bridge_features: dict[str, tuple[Tensor, Tensor]] = {}
        for name in bridges:
            family, x_b = frozen_features(name, split, n_classes, max_length)
            self.bridge_features[family] = (x_b, pack_symmetric(x_b.T @ x_b).to(torch.float32))

    @property
    def bridge_dims(self) -> tuple[tuple[str, int], ...]:
        """``AdapterSpec.bridges``: (family, width) of every bridge."""
        return tuple((f, int(x_b.shape[1])) for f, (x_b, _) in self.bridge_features.items())

    def tensors(self, task: nn.Module) -> dict[str, Tensor]:
        """This round's ``stats`` bundle, measured on ``task`` as it is now."""
        x = pooled_features(task, self.data)
        out = {**ClassStats.of(x, self.labels, self.n_classes).to_wire("own"), **self.frozen}
        for family, (x_b, gram) in self.bridge_features.items():
            out[stats_bridge_name(family, "gram")] = gram
            out[stats_bridge_name(family, "cross")] = (x_b.T @ x).to(torch.float32)
        return out


def frozen_features(
    backbone_name: str, split: Split, n_classes: int, max_length: int
) -> tuple[str, Tensor]:
    """(family, pooled features [n, d]) of ``split`` under another family's frozen fp32 backbone."""
    backbone = load_backbone(backbone_name)
    task = build_task_model(backbone, "classify", n_classes=n_classes)
    features = pooled_features(task, EncodedSplit(backbone, split, max_length))
    log.info("bridge to %s: frozen features of %d texts", backbone.spec.family, len(features))
    return backbone.spec.family, features
