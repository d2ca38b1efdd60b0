"""Pure aggregation functions on named tensors (``dict[str, Tensor]``).

Nothing here touches storage, HTTP or torch modules. Sums are accumulated in float64 and cast
back to the input dtype, and every function iterates in the order it is given, so the same
inputs in the same order give bit-identical outputs.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from edgetune.protocol.names import GROUP_FAMILY, lora_factor, lora_name

TensorDict = dict[str, Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply: its family, sample count and named tensors (deltas and values)."""

    client_id: str
    family: str
    num_samples: int
    tensors: Mapping[str, Tensor]
    tier: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FedAdapterResult:
    global_params: TensorDict
    families: dict[str, TensorDict]
    family_deltas: dict[str, TensorDict]  # d_m after optional projection
    weights: dict[str, float]  # pi_m


def _normalized(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must have a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]


def weighted_average(dicts: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> TensorDict:
    """sum_i w_i * dicts[i] / sum_i w_i, key by key (all dicts must share keys and shapes)."""
    if not dicts:
        raise ValueError("weighted_average needs at least one input")
    keys = list(dicts[0])
    for d in dicts[1:]:
        if list(d) != keys and set(d) != set(keys):
            raise ValueError(f"inputs disagree on keys: {sorted(set(d) ^ set(keys))}")
    w = torch.tensor(_normalized(weights), dtype=torch.float64)[:, None]
    out: TensorDict = {}
    for k in keys:
        like = dicts[0][k]
        stacked = torch.stack([d[k].reshape(-1) for d in dicts]).to(torch.float64)
        out[k] = (stacked * w).sum(0).reshape(like.shape).to(like.dtype)
    return out


def select(tensors: Mapping[str, Tensor], prefix: str) -> TensorDict:
    """The tensors whose names start with ``prefix`` (e.g. ``"global."``)."""
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


def fedavg(updates: Sequence[ClientUpdate], prefix: str = "") -> TensorDict:
    """Plain FedAvg (weights n_c) of the tensors under ``prefix``."""
    return weighted_average(
        [select(u.tensors, prefix) for u in updates], [u.num_samples for u in updates]
    )


def group_by_family(updates: Sequence[ClientUpdate]) -> dict[str, list[ClientUpdate]]:
    """Updates grouped by family, families in sorted order, update order preserved."""
    groups: dict[str, list[ClientUpdate]] = {}
    for u in updates:
        groups.setdefault(u.family, []).append(u)
    return {f: groups[f] for f in sorted(groups)}


def _flatten(d: Mapping[str, Tensor], keys: Sequence[str]) -> Tensor:
    return torch.cat([d[k].reshape(-1).to(torch.float64) for k in keys])


def _unflatten(vec: Tensor, like: Mapping[str, Tensor], keys: Sequence[str]) -> TensorDict:
    out, pos = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = vec[pos : pos + n].reshape(like[k].shape)
        pos += n
    return out


def project_conflicts(
    deltas: Mapping[str, Mapping[str, Tensor]], seed: int
) -> dict[str, TensorDict]:
    """Gradient-surgery conflict removal over each family's flattened global delta.

    For each family m (sorted), for the other families m' in a seeded random order: if
    ``<d_m, dbar_m'> < 0`` then ``d_m -= <d_m, dbar_m'> / |dbar_m'|^2 * dbar_m'``. Projections
    are always against the *original* family means dbar_m'. Returns float64 tensors.
    """
    fams = sorted(deltas)
    if not fams:
        return {}
    keys = sorted(deltas[fams[0]])
    flat = {m: _flatten(deltas[m], keys) for m in fams}
    rng = random.Random(seed)
    out: dict[str, TensorDict] = {}
    for m in fams:
        g = flat[m].clone()
        others = [o for o in fams if o != m]
        rng.shuffle(others)
        for o in others:
            ref = flat[o]
            norm2 = float(ref @ ref)
            dot = float(g @ ref)
            if dot < 0 and norm2 > 0:
                g -= (dot / norm2) * ref
        out[m] = _unflatten(g, deltas[m], keys)
    return out


def balanced_weights(sample_totals: Mapping[str, float], beta: float) -> dict[str, float]:
    """pi_m = N_m^beta / sum_m' N_m'^beta (beta = 0: families weigh equally)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must be in [0, 1]")
    raw = {m: float(n) ** beta for m, n in sample_totals.items()}
    total = sum(raw.values())
    return {m: v / total for m, v in raw.items()}


def merge_global(
    global_params: Mapping[str, Tensor],
    deltas: Mapping[str, Mapping[str, Tensor]],
    weights: Mapping[str, float],
    eta: float,
) -> TensorDict:
    """C_global <- C_global + eta * sum_m pi_m * d_m (accumulated in float64)."""
    out: TensorDict = {}
    for k, base in global_params.items():
        acc = base.to(torch.float64).clone()
        for m in sorted(deltas):
            acc.add_(deltas[m][k].to(torch.float64), alpha=eta * weights[m])
        out[k] = acc.to(base.dtype)
    return out


def fedadapter(
    global_params: Mapping[str, Tensor],
    updates: Sequence[ClientUpdate],
    *,
    beta: float = 1.0,
    eta: float = 1.0,
    project: bool = False,
    seed: int = 0,
) -> FedAdapterResult:
    """The cross-model aggregator of DESIGN.md section 4.

    1. family FedAvg of the ``family.*`` values (weights n_c);
    2. family mean of the ``global.*`` deltas, ``dbar_m``;
    3. optional conflict projection (``project``);
    4. ``pi_m`` from family sample totals N_m and ``beta``; global += eta * sum pi_m d_m.

    Partial updates: the family bundle of m is averaged over the updates that carry
    ``family.*`` tensors (a family none of whose clients sent it is left out of ``families``),
    the global branch over those that carry ``global.*`` deltas; N_m counts the latter.
    """
    if not updates:
        raise ValueError("fedadapter needs at least one update")
    family = f"{GROUP_FAMILY}."
    with_family = [u for u in updates if any(k.startswith(family) for k in u.tensors)]
    families = {m: fedavg(us, family) for m, us in group_by_family(with_family).items()}
    gkeys = list(global_params)
    groups = group_by_family([u for u in updates if all(k in u.tensors for k in gkeys)])
    if not groups:
        return FedAdapterResult(dict(global_params), families, {}, {})
    dbar = {
        m: weighted_average(
            [{k: u.tensors[k] for k in gkeys} for u in us], [u.num_samples for u in us]
        )
        for m, us in groups.items()
    }
    d = project_conflicts(dbar, seed) if project else dbar
    totals = {m: sum(u.num_samples for u in us) for m, us in groups.items()}
    pi = balanced_weights(totals, beta)
    new_global = merge_global(global_params, d, pi, eta)
    deltas = {m: {k: v.to(global_params[k].dtype) for k, v in dm.items()} for m, dm in d.items()}
    return FedAdapterResult(new_global, families, deltas, pi)


# -- LoRA baselines --------------------------------------------------------------------------
def lora_modules(tensors: Mapping[str, Tensor]) -> list[str]:
    """Module names that carry LoRA factors (``lora.<module>.A`` / ``.B``), sorted."""
    factors = (lora_factor(k) for k in tensors)
    return sorted(f[0] for f in factors if f is not None and f[1] == "A")


def lora_rank(tensors: Mapping[str, Tensor]) -> int:
    mods = lora_modules(tensors)
    if not mods:
        raise ValueError("no lora.<module>.A tensors")
    return int(tensors[lora_name(mods[0], "A")].shape[0])


#: The rank axis of each LoRA factor: A is [rank, d_in], B is [d_out, rank].
RANK_DIM = {"A": 0, "B": 1}


def _pad_rank(t: Tensor, rank: int, dim: int) -> Tensor:
    pad = rank - t.shape[dim]
    if pad == 0:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _non_lora_average(updates: Sequence[ClientUpdate]) -> TensorDict:
    rest = [{k: v for k, v in u.tensors.items() if lora_factor(k) is None} for u in updates]
    if not rest[0]:
        return {}
    return weighted_average(rest, [u.num_samples for u in updates])


def hetlora(updates: Sequence[ClientUpdate]) -> TensorDict:
    """HetLoRA: zero-pad every client's factors to the largest rank, FedAvg, keep r_max.

    A client of rank r gets its share back with ``truncate_lora(result, r)``.
    """
    r_max = max(lora_rank(u.tensors) for u in updates)
    padded = []
    for u in updates:
        factors = {k: lora_factor(k) for k in u.tensors}
        dims = {k: RANK_DIM[f[1]] for k, f in factors.items() if f is not None}
        padded.append({k: _pad_rank(u.tensors[k], r_max, dim) for k, dim in dims.items()})
    out = weighted_average(padded, [u.num_samples for u in updates])
    out.update(_non_lora_average(updates))
    return out


def stacked_factors(updates: Sequence[ClientUpdate], module: str) -> tuple[Tensor, Tensor]:
    """(B_stack, A_stack) with B_stack @ A_stack = sum_c w_c B_c A_c (w normalized n_c)."""
    ws = _normalized([u.num_samples for u in updates])
    a = torch.cat([u.tensors[lora_name(module, "A")].to(torch.float64) for u in updates], dim=0)
    b = torch.cat(
        [u.tensors[lora_name(module, "B")].to(torch.float64) * w for u, w in zip(updates, ws)],
        dim=1,
    )
    return b, a


def factored_svd(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of ``b @ a`` ([d_out, R] @ [R, d_in]) without forming the d_out x d_in product.

    QR of b and of a^T, then the SVD of the small ``R_b @ R_a^T``; returns (U, S, Vh) with
    ``b @ a = U diag(S) Vh`` and rank min(R, d_out, d_in).
    """
    qb, rb = torch.linalg.qr(b, mode="reduced")
    qa, ra = torch.linalg.qr(a.T, mode="reduced")
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return qb @ u, s, vh @ qa.T


def flexlora(updates: Sequence[ClientUpdate], rank: int | None = None) -> TensorDict:
    """FlexLoRA: weighted dW = sum_c w_c B_c A_c, then truncated SVD from the stacked factors.

    Returns factors at ``rank`` (default: the largest client rank), singular values split as
    ``B = U sqrt(S)``, ``A = sqrt(S) Vh`` in descending order, so a client's truncated SVD of
    rank r is ``truncate_lora(result, r)``.
    """
    r_out = rank if rank is not None else max(lora_rank(u.tensors) for u in updates)
    dtype = next(iter(updates[0].tensors.values())).dtype
    out: TensorDict = {}
    for mod in lora_modules(updates[0].tensors):
        b, a = stacked_factors(updates, mod)
        u, s, vh = factored_svd(b, a)
        k = min(r_out, s.shape[0])
        root = s[:k].sqrt()
        new_b, new_a = u[:, :k] * root, root[:, None] * vh[:k]
        out[lora_name(mod, "B")] = _pad_rank(new_b, r_out, 1).to(dtype)
        out[lora_name(mod, "A")] = _pad_rank(new_a, r_out, 0).to(dtype)
    out.update(_non_lora_average(updates))
    return out


def flora(updates: Sequence[ClientUpdate]) -> TensorDict:
    """FLoRA: stack the clients' factors (in the given order) so B @ A = sum_c w_c B_c A_c.

    The stacked rank is sum_c r_c; clients merge B @ A into their frozen weights and start a
    fresh LoRA next round.
    """
    dtype = next(iter(updates[0].tensors.values())).dtype
    out: TensorDict = {}
    for mod in lora_modules(updates[0].tensors):
        b, a = stacked_factors(updates, mod)
        out[lora_name(mod, "B")] = b.to(dtype)
        out[lora_name(mod, "A")] = a.to(dtype)
    out.update(_non_lora_average(updates))
    return out


def truncate_lora(tensors: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Fit LoRA factors to ``rank``: slice (A[:rank], B[:, :rank]) or zero-pad when smaller.

    Other tensors pass through unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        factor = lora_factor(name)
        if factor is None:
            out[name] = t
            continue
        dim = RANK_DIM[factor[1]]
        fitted = t.narrow(dim, 0, min(rank, t.shape[dim]))
        if fitted.shape[dim] < rank:
            shape = list(t.shape)
            shape[dim] = rank - fitted.shape[dim]
            fitted = torch.cat([fitted, t.new_zeros(shape)], dim=dim)
        out[name] = fitted.contiguous()
    return out
