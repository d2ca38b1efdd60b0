"""The setup `edgetune profile` measures: a task model with its adapter, and its wire spec.

The adapter goes in through `edgetune.adapters.inject` and its wire spec comes from
`edgetune.adapters.wire_spec`, the rule every client registers with. A setting the wire
protocol cannot carry has no spec, and the Setup says why (`off_wire`): full fine-tuning (not a
protocol kind), or FedAdapter on blocks or branches the wire does not express.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from edgetune.adapters.build import inject, wire_spec
from edgetune.config import AdapterConfig, LoraConfig
from edgetune.errors import ConfigError
from edgetune.measure.names import ADAPTER_FULL, ADAPTERS
from edgetune.models.heads import build_task_model
from edgetune.models.zoo import Backbone, load_backbone
from edgetune.protocol import QUANT_NONE, AdapterSpec

FULL_NOTE = "full fine-tuning: every trainable tensor (not a protocol kind)"


@dataclass
class Setup:
    """A task model with its adapter injected, what trains, and the wire spec.

    ``spec`` is None when the setting does not travel on the wire; ``off_wire`` says why.
    """

    backbone: Backbone
    adapter: str
    task: nn.Module
    trainable: list[nn.Parameter]
    spec: AdapterSpec | None
    off_wire: str | None = None


def build_setup(
    backbone: Backbone,
    adapter: str,
    n_classes: int,
    adapter_config: AdapterConfig,
    lora_config: LoraConfig,
) -> Setup:
    """``adapter`` (fedadapter | lora | full) on ``backbone`` under a ``n_classes`` head."""
    if adapter not in ADAPTERS:
        raise ConfigError(f"adapter={adapter!r}: allowed values are {ADAPTERS}")
    task = build_task_model(backbone, "classify", n_classes=n_classes)
    if adapter == ADAPTER_FULL:
        for param in task.parameters():
            param.requires_grad_(True)
        return Setup(backbone, adapter, task, list(task.parameters()), None, FULL_NOTE)
    handle = inject(adapter, backbone, task.head, adapter_config, lora_config)
    try:
        spec, reason = wire_spec(backbone.spec, handle, n_classes), None
    except ConfigError as err:  # measurable, but no client could register it
        spec, reason = None, str(err)
    return Setup(backbone, adapter, task, handle.trainable_parameters(), spec, reason)


def load_setup(
    name: str,
    quant: str,
    adapter: str,
    n_classes: int,
    adapter_config: AdapterConfig,
    lora_config: LoraConfig,
    device: str = "cpu",
) -> Setup:
    """`build_setup` on zoo backbone ``name`` loaded at ``quant`` on ``device``."""
    options = {} if quant == QUANT_NONE else {"quant": quant}
    backbone = load_backbone(name, device=device, **options)
    return build_setup(backbone, adapter, n_classes, adapter_config, lora_config)


def random_batch(
    backbone: Backbone, batch: int, seq: int, n_classes: int, device: str = "cpu"
) -> tuple[dict[str, Tensor], Tensor]:
    """A fixed random batch on ``device``: full-length token ids (or images) and labels."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, n_classes, (batch,), generator=gen)
    if backbone.spec.modality == "image":
        size = backbone.preprocess.size if backbone.preprocess is not None else 224
        features = {"pixel_values": torch.randn(batch, 3, size, size, generator=gen)}
    else:
        ids = torch.randint(1000, 30000, (batch, seq), generator=gen)
        features = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    return {k: v.to(device) for k, v in features.items()}, labels.to(device)


def parameter_counts(setup: Setup) -> dict[str, int]:
    """Trainable, frozen and total parameters (each tensor once)."""
    ids = {id(p) for p in setup.trainable}
    total = {id(p): p.numel() for p in setup.task.parameters()}
    total.update({id(p): p.numel() for p in setup.trainable})
    return {
        "trainable": sum(p.numel() for p in setup.trainable),
        "total": sum(total.values()),
        "frozen": sum(n for i, n in total.items() if i not in ids),
    }


def device_of(setup: Setup) -> torch.device:
    """Where the setup's weights live."""
    return next(setup.task.parameters()).device


def step_closure(setup: Setup, features: dict[str, Tensor], labels: Tensor) -> Callable[[], float]:
    """One training step (cross-entropy, AdamW on the trainable tensors); returns the loss."""
    optimizer = torch.optim.AdamW(setup.trainable, lr=1e-4)
    task = setup.task

    def step() -> float:
        task.train()
        loss = nn.functional.cross_entropy(task(**features), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step
