"""The handle `apply_fedadapter` returns: wire names, parameter groups, save/load, removal.

Groups (the names are those of `edgetune.protocol.core`):
- `global`:  `global.anchor{k}.C|q`, k = 1..K; the same names and shapes in every family;
- `family`:  `family.layer{l}.D|b_D|C|q|U|b_U|alpha_logits|W_alpha` and the head
             `family.head.weight|bias`; aggregated among clients of one family;
- `private`: `private.layer{l}.C|q`; never leaves the client;
- `head`:    the `family.head.*` subset of `family`, for callers that want it alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from edgetune.config.sections import section_json
from edgetune.errors import ConfigError
from edgetune.protocol import (
    GATE_LEAF,
    GROUP_FAMILY,
    GROUP_GLOBAL,
    GROUP_PRIVATE,
    GROUPS,
    META_ADAPTER_CONFIG,
    META_BACKBONE,
    META_CLASSES,
    META_FAMILY,
    META_FINGERPRINT,
    META_GROUPS,
    family_name,
    global_name,
    head_name,
    in_group,
    private_name,
)


class AdapterHandle:
    """Owns the injected adapters of one model; `remove()` restores the original modules."""

    def __init__(
        self,
        model: nn.Module,
        spec,
        config,
        layers: dict[int, nn.Module],
        anchors: list[int],
        originals: dict[str, nn.Module],
        head: nn.Module | None,
    ) -> None:
        self.model = model
        self.spec = spec
        self.config = config
        self.layers = layers
        self.anchors = anchors
        self.head = head
        self.classes: tuple[str, ...] = ()  # the head's class names, saved with the adapter
        self._originals = originals
        self._tensors = {**self._name_tensors(), **self._head_tensors()}

    def _name_tensors(self) -> dict[str, nn.Parameter]:
        named: dict[str, nn.Parameter] = {}
        for k, block in enumerate(self.anchors, start=1):
            layer = self.layers[block]
            named[global_name(k, "C")], named[global_name(k, "q")] = (
                layer.C[GROUP_GLOBAL],
                layer.q[GROUP_GLOBAL],
            )
        for block, layer in self.layers.items():
            for leaf in ("D", "b_D"):
                named[family_name(block, leaf)] = getattr(layer, leaf)
            if GROUP_FAMILY in layer.branches:
                named[family_name(block, "C")] = layer.C[GROUP_FAMILY]
                named[family_name(block, "q")] = layer.q[GROUP_FAMILY]
            for leaf in ("U", "b_U", GATE_LEAF[layer.gate]):
                named[family_name(block, leaf)] = getattr(layer, leaf)
            if GROUP_PRIVATE in layer.branches:
                named[private_name(block, "C")] = layer.C[GROUP_PRIVATE]
                named[private_name(block, "q")] = layer.q[GROUP_PRIVATE]
        return named

    def _head_tensors(self) -> dict[str, nn.Parameter]:
        """The task head stays trainable and travels with the family bundle."""
        named: dict[str, nn.Parameter] = {}
        if self.head is not None:
            for leaf, param in self.head.named_parameters():
                param.requires_grad_(True)
                named[head_name(leaf)] = param
        return named

    # -- views -------------------------------------------------------------------------
    def named_tensors(self, group: str | None = None) -> dict[str, nn.Parameter]:
        if group is not None and group not in GROUPS:
            raise ConfigError(f"unknown adapter group {group!r}; groups are {GROUPS}")
        return {n: t for n, t in self._tensors.items() if group is None or in_group(n, group)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self._tensors.values())

    def state_dict_for(self, group: str) -> dict[str, Tensor]:
        """Detached copies of a group's tensors, keyed by wire name."""
        return {n: t.detach().clone() for n, t in self.named_tensors(group).items()}

    def parameter_counts(self) -> dict[str, int]:
        counts = {g: sum(t.numel() for t in self.named_tensors(g).values()) for g in GROUPS}
        counts["adapter_total"] = sum(t.numel() for t in self._tensors.values())
        counts["backbone"] = sum(
            p.numel()
            for n, p in self.model.named_parameters()
            if not any(p is t for t in self._tensors.values())
        )
        return counts

    # -- loading -----------------------------------------------------------------------
    def load_group(self, group: str, tensors: dict[str, Tensor], strict: bool = True) -> None:
        """Copy `tensors` into the group's parameters; key set and shapes must match exactly."""
        own = self.named_tensors(group)
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if strict and (missing or extra):
            raise ConfigError(f"group {group!r}: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, value in tensors.items():
            if name not in own:
                continue
            if tuple(value.shape) != tuple(own[name].shape):
                raise ConfigError(
                    f"{name}: shape {tuple(value.shape)} != expected {tuple(own[name].shape)}"
                )
            if not torch.isfinite(value).all():
                raise ConfigError(f"{name}: contains NaN or inf")
        with torch.no_grad():
            for name, value in tensors.items():
                if name in own:
                    own[name].copy_(value.to(own[name].dtype))

    # -- files -------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        """What an adapter file carries besides tensors: enough to rebuild and export it."""
        meta = {
            META_ADAPTER_CONFIG: section_json(self.config),
            META_FINGERPRINT: self.spec.fingerprint,
            META_FAMILY: self.spec.family,
            META_BACKBONE: self.spec.name,
        }
        if self.classes:
            meta[META_CLASSES] = json.dumps(list(self.classes))
        return meta

    def save(
        self,
        path: str | Path,
        groups: tuple[str, ...] = (GROUP_GLOBAL, GROUP_FAMILY, GROUP_PRIVATE),
    ) -> None:
        tensors: dict[str, Tensor] = {}
        for group in groups:
            tensors.update({n: t.contiguous() for n, t in self.state_dict_for(group).items()})
        meta = {**self.metadata(), META_GROUPS: ",".join(groups)}
        save_file(tensors, str(path), metadata=meta)

    def load(self, path: str | Path) -> None:
        """Load a file written by `save`; a different backbone or config is refused by name."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as handle:
                meta = handle.metadata() or {}
        except (OSError, SafetensorError) as err:
            raise ConfigError(f"{path}: not a readable safetensors adapter file ({err})") from err
        expected = self.metadata()
        for key, label in (
            (META_FAMILY, "family"),
            (META_FINGERPRINT, "backbone fingerprint"),
            (META_ADAPTER_CONFIG, "adapter config"),
        ):
            if meta.get(key) != expected[key]:
                raise ConfigError(
                    f"{path}: {label} {meta.get(key)!r} does not match this model's "
                    f"{expected[key]!r}"
                )
        tensors = load_file(str(path))
        for group in meta.get(META_GROUPS, "").split(","):
            if group:
                self.load_group(group, {n: t for n, t in tensors.items() if in_group(n, group)})

    # -- removal -----------------------------------------------------------------------
    def remove(self) -> nn.Module:
        """Put the original feed-forward modules back; the adapters are dropped."""
        for path, original in self._originals.items():
            parent_path, _, leaf = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            setattr(parent, leaf, original)
        self._originals = {}
        return self.model
