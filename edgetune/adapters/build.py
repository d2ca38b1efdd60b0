"""Put an adapter of a given kind on a backbone, and describe it on the wire: one rule each.

The client runtime, the simulation's evaluator and `edgetune profile` all go through
`inject` and `wire_spec`, so the wire spec of an adapter is derived in exactly one way.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from torch import nn

from edgetune.adapters.fedadapter import apply_fedadapter
from edgetune.adapters.handle import AdapterHandle
from edgetune.adapters.lora import LoraHandle, apply_lora
from edgetune.config import AdapterConfig, LoraConfig
from edgetune.errors import ConfigError
from edgetune.protocol import BRANCHES, KIND_FEDADAPTER, KIND_LORA, AdapterSpec, first_block_of

if TYPE_CHECKING:
    from edgetune.models.zoo import Backbone, BackboneSpec


def inject(
    kind: str,
    backbone: Backbone,
    head: nn.Module | None,
    adapter: AdapterConfig,
    lora: LoraConfig,
    rank: int = 0,
) -> AdapterHandle:
    """Swap an adapter of ``kind`` (fedadapter | lora) into the backbone at ``rank`` (0: the
    section's own rank); the backbone is frozen, ``head`` stays trainable."""
    if kind == KIND_FEDADAPTER:
        config = dataclasses.replace(adapter, rank=rank) if rank else adapter
        return apply_fedadapter(backbone.model, backbone.spec, config, head=head)
    if kind == KIND_LORA:
        config = dataclasses.replace(lora, rank=rank) if rank else lora
        return apply_lora(backbone.model, backbone.spec, config, head=head)
    raise ConfigError(f"adapter kind {kind!r}: allowed values are {(KIND_FEDADAPTER, KIND_LORA)}")


def wire_spec(backbone_spec: BackboneSpec, handle: AdapterHandle, n_classes: int) -> AdapterSpec:
    """The AdapterSpec a client with this handle registers with.

    FedAdapter travels on blocks ``all`` or ``from:N`` with all three branches; any other
    setting is not expressible on the wire and is refused by name.
    """
    common = {
        "family": backbone_spec.family,
        "fingerprint": backbone_spec.fingerprint,
        "d_model": backbone_spec.hidden_size,
        "n_layers": backbone_spec.num_layers,
        "n_classes": n_classes,
    }
    config = handle.config
    if isinstance(handle, LoraHandle):
        return AdapterSpec(
            kind=KIND_LORA, rank=config.rank, lora_modules=handle.module_shapes(), **common
        )
    first = first_block_of(config.blocks)
    if first is None or tuple(config.branches) != BRANCHES:
        raise ConfigError(
            f"adapter.blocks={config.blocks!r}, adapter.branches={list(config.branches)}: the "
            "wire protocol carries adapters on blocks 'all' or 'from:N' with all three branches"
        )
    return AdapterSpec(
        kind=KIND_FEDADAPTER,
        rank=config.rank,
        n_anchors=config.n_anchors,
        gate=config.gate,
        first_block=first,
        **common,
    )
