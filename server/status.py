"""The ``/v1/status`` document: rounds, participants, bytes in/out, per-family metrics.

A pure function of the stored state plus what only the coordinator knows (strategy name, the
current round's info, download bytes not yet flushed); it imports nothing but ``storage``.
"""

from __future__ import annotations

from typing import Any

from .storage import Storage


def _rounds(storage: Storage) -> list[dict[str, Any]]:
    out = []
    for r in storage.rounds():
        ups = storage.updates(r.round_id)
        out.append(
            {
                "round": r.round_id,
                "state": r.state,
                "opened_at": r.opened_at,
                "deadline": r.deadline,
                "closed_at": r.closed_at,
                "extensions": r.extensions,
                "participants": sorted(u.client_id for u in ups),
                "families": sorted({u.family for u in ups}),
                "bytes_in": sum(u.nbytes for u in ups),
                "summary": r.summary,
            }
        )
    return out


def _metrics(storage: Storage) -> dict[str, dict[str, Any]]:
    """family -> round -> tier -> metric -> sample-weighted mean (plus clients, num_samples)."""
    per_family: dict[str, dict[str, Any]] = {}
    for round_id, family, tier, key, value in storage.round_metrics_rows():
        fam = per_family.setdefault(family, {})
        fam.setdefault(str(round_id), {}).setdefault(tier, {})[key] = value
    return per_family


def build_status(
    storage: Storage, *, strategy: str, current: dict[str, Any], bytes_out: int
) -> dict[str, Any]:
    """The status document; ``current`` is the round info, ``bytes_out`` all bytes served."""
    return {
        "strategy": strategy,
        "current": current,
        "rounds": _rounds(storage),
        "clients": [
            {"family": family, "tier": tier, "count": n}
            for family, tier, n in storage.clients_by_tier()
        ],
        "bytes_in": storage.counter("bytes_in"),
        "bytes_out": bytes_out,
        "uploads": storage.counter("uploads"),
        "metrics": _metrics(storage),
    }


def client_view(status: dict[str, Any], client_id: str) -> dict[str, Any]:
    """The status as one client may read it: the participants of each round are counted, and
    only this client is named among them."""
    rounds = []
    for r in status["rounds"]:
        named = [c for c in r["participants"] if c == client_id]
        rounds.append({**r, "participants": named, "participant_count": len(r["participants"])})
    return {**status, "rounds": rounds}
