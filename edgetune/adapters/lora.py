"""LoRA in the same framework as the FedAdapter, for the baselines (FedAvg-LoRA, HetLoRA, ...).

`out = base(x) + (dropout(x) @ A^T @ B^T) * alpha / rank`, with A Kaiming-uniform and B = 0 at
init: numerically the computation of PEFT's `LoraConfig(r, lora_alpha, target_modules)`, so a
model with the same A and B gives the same outputs. Tensors travel as `lora.<module>.A`
([rank, d_in]) and `lora.<module>.B` ([d_out, rank]).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from edgetune.adapters.handle import AdapterHandle
from edgetune.config import LoraConfig
from edgetune.errors import ConfigError
from edgetune.protocol import lora_name


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, config: LoraConfig) -> None:
        super().__init__()
        self.base = base
        self.scaling = config.alpha / config.rank
        device = base.weight.device
        self.A = nn.Parameter(torch.empty(config.rank, base.in_features, device=device))
        self.B = nn.Parameter(torch.zeros(base.out_features, config.rank, device=device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        # FLoRA folds each round's aggregated B @ A into a frozen dense delta; with a quantized
        # base layer the weights cannot absorb it, so it lives beside them ([d_out, d_in]).
        self.register_buffer("merged", None)

    def forward(self, x: Tensor) -> Tensor:
        update = (self.dropout(x).to(self.A.dtype) @ self.A.T) @ self.B.T
        out = self.base(x) + (update * self.scaling).to(x.dtype)
        if self.merged is not None:
            out = out + (x.to(self.merged.dtype) @ self.merged.T).to(x.dtype)
        return out

    @torch.no_grad()
    def merge(self, B: Tensor, A: Tensor) -> None:
        """Add `B @ A` (stacked wire factors of any rank) to the frozen merged delta.

        Wire B factors already carry their sender's `alpha / rank` (see `wire_B`), so clients
        of different ranks contribute their true updates.
        """
        delta = B.to(self.A.dtype) @ A.to(self.A.dtype)
        self.merged = delta if self.merged is None else self.merged + delta

    @torch.no_grad()
    def reset(self, seed: int) -> None:
        """Restart the trainable factors: A Kaiming-uniform from `seed`, B = 0."""
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(self.A.shape[1])  # kaiming_uniform_(a=sqrt(5)) on [r, d_in]
        self.A.copy_(torch.rand(self.A.shape, generator=generator) * 2 * bound - bound)
        self.B.zero_()


class LoraHandle(AdapterHandle):
    """Adapter handle whose tensors are `lora.<module>.A|B` (group `lora`); the base class adds
    the head."""

    def __init__(
        self,
        model: nn.Module,
        spec,
        config: LoraConfig,
        modules: dict[str, LoraLinear],
        originals: dict[str, nn.Module],
        head: nn.Module | None,
    ) -> None:
        self.lora_modules = modules
        super().__init__(model, spec, config, {}, [], originals, head)

    def _name_tensors(self) -> dict[str, nn.Parameter]:
        named: dict[str, nn.Parameter] = {}
        for path, module in self.lora_modules.items():
            named[lora_name(path, "A")], named[lora_name(path, "B")] = module.A, module.B
        return named

    def module_shapes(self) -> tuple[tuple[str, int, int], ...]:
        """(module, d_in, d_out) per adapted module, as the wire spec lists them."""
        return tuple(
            (p, m.base.in_features, m.base.out_features) for p, m in self.lora_modules.items()
        )


#: LoRA's modules per architecture when ``lora.targets`` is empty: PEFT's per-model defaults
#: (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``; a test holds them equal), the
#: attention's query and value projections.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "vit": ("query", "value"),
    "llama": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
}


def resolve_targets(config: LoraConfig, spec) -> tuple[str, ...]:
    """``config.targets``, or the architecture's default when it is empty."""
    if config.targets:
        return tuple(config.targets)
    if spec.architecture not in DEFAULT_TARGETS:
        raise ConfigError(
            f"lora.targets=[] but {spec.name} ({spec.architecture}) has no default LoRA targets "
            f"(known for {sorted(DEFAULT_TARGETS)}); name its modules in lora.targets"
        )
    return DEFAULT_TARGETS[spec.architecture]


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last name components of the model's linear layers (what targets match)."""
    return sorted(
        {n.rpartition(".")[2] for n, m in model.named_modules() if hasattr(m, "in_features")}
    )


def apply_lora(
    model: nn.Module, spec, config: LoraConfig, head: nn.Module | None = None
) -> LoraHandle:
    """Wrap every linear layer whose last name component is in `config.targets` (empty: the
    architecture's `DEFAULT_TARGETS`); the handle's config names the targets used."""
    config = dataclasses.replace(config, targets=resolve_targets(config, spec))
    for param in model.parameters():
        param.requires_grad_(False)
    targets = [
        name
        for name, module in model.named_modules()
        if name.rpartition(".")[2] in config.targets and hasattr(module, "in_features")
    ]
    if not targets:
        raise ConfigError(
            f"lora.targets={list(config.targets)} match no linear layer of {spec.name}; "
            f"its linear layers are named {linear_names(model)}"
        )
    originals: dict[str, nn.Module] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(spec.fingerprint[:8], 16))  # same A for every client of a family
        modules = {path: LoraLinear(model.get_submodule(path), config) for path in targets}
    for path in targets:
        originals[path] = modules[path].base
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, leaf, modules[path])
    return LoraHandle(model, spec, config, modules, originals, head)
