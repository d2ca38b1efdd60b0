"""The ``/v1/status`` document: rounds, participants, bytes in/out, per-family metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .rounds import Coordinator


def _rounds(coord: Coordinator) -> list[dict[str, Any]]:
    out = []
    for r in coord.storage.rounds():
        ups = coord.storage.updates(r.round_id)
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


def _metrics(coord: Coordinator) -> dict[str, dict[str, Any]]:
    """family -> round -> tier -> metric -> sample-weighted mean (plus clients, num_samples)."""
    rows = coord.storage.query("SELECT * FROM round_metrics ORDER BY round_id, family, tier, key")
    per_family: dict[str, dict[str, Any]] = {}
    for m in rows:
        fam = per_family.setdefault(m["family"], {})
        fam.setdefault(str(m["round_id"]), {}).setdefault(m["tier"], {})[m["key"]] = m["value"]
    return per_family


def build_status(coord: Coordinator) -> dict[str, Any]:
    clients = coord.storage.query(
        "SELECT family, tier, COUNT(*) AS n FROM clients GROUP BY family, tier ORDER BY family, tier"
    )
    return {
        "strategy": coord.strategy.name,
        "current": coord.round_info(),
        "rounds": _rounds(coord),
        "clients": [{"family": c["family"], "tier": c["tier"], "count": c["n"]} for c in clients],
        "bytes_in": coord.storage.counter("bytes_in"),
        "bytes_out": coord.bytes_out(),
        "uploads": coord.storage.counter("uploads"),
        "metrics": _metrics(coord),
    }
