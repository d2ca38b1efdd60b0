"""FedAdapter: the multi-branch parallel adapter of DESIGN.md section 3, injected into a backbone.

Per adapted block l (x: the feed-forward input, [..., d]):

    z     = gelu(x @ D + b_D)                          D: [d, r]  family
    u     = z + sum_b alpha_b * (z @ C_b + q_b)        branches: global (anchor blocks only),
                                                                 family, private; C_b: [r, r]
    delta = s * (u @ U + b_U)                          U: [r, d]  family, zero at init

The whole computation is one call of the fused op `edgetune.kernels.fused_adapter`, which also
adds the FFN output it is given as `residual`. `apply_fedadapter` swaps module *instances* on the
given model (the block's FFN output module becomes a wrapper holding the original and the
adapter), freezes every backbone parameter and returns an `AdapterHandle`, which names the
trainable tensors with the wire names of `edgetune.protocol.core` and can remove the adapters again.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from edgetune import kernels
from edgetune.adapters.handle import AdapterHandle
from edgetune.config import AdapterConfig
from edgetune.errors import ConfigError
from edgetune.models.zoo import BackboneSpec
from edgetune.protocol import GROUP_GLOBAL


class FedAdapterLayer(nn.Module):
    """The adapter of one block: family D/U, per-branch C/q, and the mixing gate."""

    def __init__(self, d_model: int, config: AdapterConfig, branches: tuple[str, ...]) -> None:
        """Parameters are created on CPU in fp32 from the current RNG state."""
        super().__init__()
        r, n = config.rank, len(branches)
        self.branches = branches
        self.scale = config.scale
        self.gate = config.gate
        self.D = nn.Parameter(torch.empty(d_model, r))
        self.b_D = nn.Parameter(torch.zeros(r))
        self.U = nn.Parameter(
            torch.zeros(r, d_model)
        )  # zero: the adapted model starts as the backbone
        self.b_U = nn.Parameter(torch.zeros(d_model))
        self.C = nn.ParameterDict({b: nn.Parameter(torch.zeros(r, r)) for b in branches})
        self.q = nn.ParameterDict({b: nn.Parameter(torch.zeros(r)) for b in branches})
        if config.gate == "layer":
            self.alpha_logits = nn.Parameter(torch.zeros(n))  # softmax -> uniform at init
        else:
            self.W_alpha = nn.Parameter(torch.zeros(r, n))
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        # Kaiming as nn.Linear(d, r) would init its [r, d] weight; D is that weight transposed.
        nn.init.kaiming_uniform_(self.D.T, a=math.sqrt(5))

    def mixing_weights(self, x: Tensor) -> Tensor:
        """alpha: [n] for the per-layer gate, [..., n] per token (softmax(z @ W_alpha))."""
        if self.gate == "layer":
            return torch.softmax(self.alpha_logits, dim=0)
        # The token gate needs z before the fused op runs; computing it costs one extra
        # skinny GEMM x @ D (the op recomputes z internally rather than storing it).
        z = torch.nn.functional.gelu(x @ self.D.to(x.dtype) + self.b_D.to(x.dtype))
        return torch.softmax(z @ self.W_alpha.to(x.dtype), dim=-1)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        x = self.dropout(x)
        C = torch.stack([self.C[b] for b in self.branches])
        q = torch.stack([self.q[b] for b in self.branches])
        return kernels.fused_adapter(
            x,
            self.D,
            self.b_D,
            C,
            q,
            self.mixing_weights(x),
            self.U,
            self.b_U,
            self.scale,
            residual=residual,
        )


class BertOutputWithAdapter(nn.Module):
    """Post-LN BERT block: LayerNorm(dropout(dense(h)) + delta(x) + x), x = attention output."""

    def __init__(self, base: nn.Module, adapter: FedAdapterLayer) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        ffn_out = self.base.dropout(self.base.dense(hidden_states))
        ffn_out = self.adapter(input_tensor, residual=ffn_out.to(input_tensor.dtype))
        return self.base.LayerNorm(ffn_out + input_tensor)


class MlpWithAdapter(nn.Module):
    """Pre-LN block (ViT, GPT-2, Llama): mlp(x) + delta(x), before the residual add."""

    def __init__(self, base: nn.Module, adapter: FedAdapterLayer) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        mlp_out = self.base(x, *args, **kwargs)
        return self.adapter(x, residual=mlp_out.to(x.dtype))


class PostNormMlpWithAdapter(nn.Module):
    """Gemma-3 block (norms before and after the MLP): post_norm(mlp(x)) + delta(x), before the
    residual add, as in every pre-LN block; the block's own post-FFN norm is the identity while
    the adapter is in (the handle restores it). Joined before that norm instead, a delta the size
    of the MLP output (RMS 0.06-0.18 in Gemma-3-270M's blocks 10-17) takes over the block's
    FFN, and the norm's gain (670-5000x there) passes it on: per unit of adapter output the
    residual stream moved 140-570x as much as in SmolLM2's blocks 12-27 (0.1-0.25x joined
    after the norm), and the LLM run diverged after one round."""

    def __init__(self, base: nn.Module, adapter: FedAdapterLayer, post_norm: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.post_norm = post_norm

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        mlp_out = self.post_norm(self.base(x, *args, **kwargs))
        return self.adapter(x, residual=mlp_out.to(x.dtype))


_WRAPPERS = {
    "bert_output": BertOutputWithAdapter,
    "mlp": MlpWithAdapter,
    "mlp_postnorm": PostNormMlpWithAdapter,
}
POST_NORM = "post_feedforward_layernorm"  # the sibling of the MLP that mlp_postnorm absorbs


def _wrap(
    model: nn.Module,
    style: str,
    path: str,
    base: nn.Module,
    adapter: FedAdapterLayer,
    originals: dict[str, nn.Module],
) -> nn.Module:
    """The wrapper of ``style``; mlp_postnorm also swaps the block's post-FFN norm for the
    identity (recorded in ``originals``, so removal restores it)."""
    if style != "mlp_postnorm":
        return _WRAPPERS[style](base, adapter)
    norm_path = f"{path.rpartition('.')[0]}.{POST_NORM}"
    norm = model.get_submodule(norm_path)
    originals[norm_path] = norm
    _set_submodule(model, norm_path, nn.Identity())
    return PostNormMlpWithAdapter(base, adapter, norm)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def apply_fedadapter(
    model: nn.Module,
    spec: BackboneSpec,
    config: AdapterConfig,
    head: nn.Module | None = None,
    seed: int | None = None,
) -> AdapterHandle:
    """Inject one FedAdapterLayer per adapted block; freeze the backbone; return the handle.

    `head` (e.g. the classifier of a task model) stays trainable and is named `family.head.*`.
    `seed` fixes the initialisation (default: derived from the backbone fingerprint).
    """
    if spec.ffn_style not in _WRAPPERS:
        raise ConfigError(
            f"{spec.name}: FedAdapter needs a transformer backbone; "
            f"{spec.architecture} has no feed-forward sub-layers"
        )
    blocks = config.adapted_blocks(spec.num_layers)
    anchors = config.anchor_blocks(spec.num_layers)
    for param in model.parameters():
        param.requires_grad_(False)
    originals: dict[str, nn.Module] = {}
    layers: dict[int, FedAdapterLayer] = {}
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        # Every client of a family starts from the same D (FedAvg of differently drawn random
        # projections would average towards zero): the seed derives from the fingerprint.
        torch.manual_seed(int(spec.fingerprint[:8], 16) if seed is None else seed)
        for block in blocks:
            branches = tuple(b for b in config.branches if b != GROUP_GLOBAL or block in anchors)
            layers[block] = FedAdapterLayer(spec.hidden_size, config, branches).to(device)
    for block in blocks:
        path = spec.ffn_paths[block]
        base = model.get_submodule(path)
        if isinstance(base, tuple(_WRAPPERS.values())):
            raise ConfigError(f"{path} already carries an adapter; remove it first")
        originals[path] = base
        _set_submodule(
            model, path, _wrap(model, spec.ffn_style, path, base, layers[block], originals)
        )
    return AdapterHandle(model, spec, config, layers, anchors, originals, head)
