"""The LoRA baselines: FedAvg-LoRA, HetLoRA, FlexLoRA and FLoRA, server side and client hooks.

LoRA B factors travel as ``B * alpha / rank`` so the server aggregates true updates when
clients' ranks (and so their scalings) differ; the client hooks convert both ways.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from edgetune.protocol import GROUP_HEAD, GROUP_LORA, KIND_LORA, AdapterSpec, lora_name
from edgetune.strategies import aggregation as agg
from edgetune.strategies.aggregation import ClientUpdate, TensorDict, truncate_lora
from edgetune.strategies.base import Models, Replies, Specs, State, Strategy, family_model
from edgetune.strategies.hooks import ClientHooks


class _PerFamily(Strategy):
    kind = KIND_LORA

    def aggregate(self, round_id: int, state: State, updates: Replies, specs: Specs) -> Models:
        return {
            family_model(m): self.aggregate_family(us)
            for m, us in agg.group_by_family(updates).items()
        }

    @abstractmethod
    def aggregate_family(self, updates: Sequence[ClientUpdate]) -> TensorDict: ...


class FedAvgStrategy(_PerFamily):
    """Homogeneous FedAvg-LoRA: every client of a family has the same rank."""

    name = "fedavg-lora"

    def check_spec(self, spec: AdapterSpec, pinned: AdapterSpec | None) -> str | None:
        reason = super().check_spec(spec, pinned)
        if reason is None and pinned is not None and spec.rank != pinned.rank:
            return f"fedavg-lora needs equal ranks: {spec.rank} != {pinned.rank}"
        return reason

    def aggregate_family(self, updates: Sequence[ClientUpdate]) -> TensorDict:
        return agg.fedavg(updates)


class HetLoRAStrategy(_PerFamily):
    name = "hetlora"
    per_client_views = True

    def aggregate_family(self, updates: Sequence[ClientUpdate]) -> TensorDict:
        return agg.hetlora(updates)

    def download_view(self, tensors: TensorDict, spec: AdapterSpec) -> TensorDict:
        return truncate_lora(tensors, spec.rank)


class FlexLoRAStrategy(HetLoRAStrategy):
    name = "flexlora"

    def aggregate_family(self, updates: Sequence[ClientUpdate]) -> TensorDict:
        return agg.flexlora(updates)


class FLoRAStrategy(_PerFamily):
    """Stacked factors; clients merge B @ A into their weights and restart LoRA each round."""

    name = "flora"

    def aggregate_family(self, updates: Sequence[ClientUpdate]) -> TensorDict:
        return agg.flora(updates)


class LoraClient(ClientHooks):
    """LoRA factors and head travel as values; B scaled by alpha / rank on the wire."""

    saved_groups: ClassVar[tuple[str, ...]] = (GROUP_LORA, GROUP_HEAD)

    @staticmethod
    def wire_scaled(handle: Any, tensors: TensorDict, power: float) -> TensorDict:
        """``B * scaling**power`` for every LoRA module (power 1: to the wire, -1: back)."""
        out = dict(tensors)
        for path, module in handle.lora_modules.items():
            name = lora_name(path, "B")
            if name in out:
                out[name] = out[name] * module.scaling**power
        return out

    def load_family(self, handle: Any, tensors: TensorDict, version: int) -> None:
        tensors = self.wire_scaled(handle, tensors, -1.0)
        for group in self.saved_groups:
            own = handle.named_tensors(group)
            handle.load_group(group, {n: t for n, t in tensors.items() if n in own})

    def upload_tensors(self, handle: Any, sent_global: TensorDict) -> TensorDict:
        lora = self.wire_scaled(handle, handle.state_dict_for(GROUP_LORA), 1.0)
        return {**lora, **handle.state_dict_for(GROUP_HEAD)}


class FloraClient(LoraClient):
    """FLoRA: fold the stacked product B @ A into each layer once per served version, then
    restart LoRA from a fresh A and B = 0."""

    def __init__(self) -> None:
        self.merged_version = -1

    def load_family(self, handle: Any, tensors: TensorDict, version: int) -> None:
        head = handle.named_tensors(GROUP_HEAD)
        handle.load_group(GROUP_HEAD, {n: t for n, t in tensors.items() if n in head})
        if version <= self.merged_version:  # `?version=N` may serve an already folded model
            return
        for path, module in handle.lora_modules.items():
            module.merge(tensors[lora_name(path, "B")], tensors[lora_name(path, "A")])
            module.reset(seed=int(handle.spec.fingerprint[:8], 16) + version)
        self.merged_version = version

    def extra_state(self, handle: Any) -> tuple[TensorDict, int]:
        modules = handle.lora_modules.items()
        merged = {p: m.merged.contiguous() for p, m in modules if m.merged is not None}
        return merged, self.merged_version

    def load_extra_state(self, handle: Any, tensors: TensorDict, version: int) -> None:
        for path, delta in tensors.items():
            handle.lora_modules[path].merged = delta
        self.merged_version = version
