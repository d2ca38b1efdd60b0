"""The rows of the server's state as the rest of the server sees them (storage.py reads them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ClientRecord:
    client_id: str
    family: str
    tier: str
    spec_json: str
    spec_hash: str
    created_at: float = 0.0
    revoked: bool = False


@dataclass(frozen=True)
class RoundRecord:
    round_id: int
    state: str
    opened_at: float
    deadline: float
    extensions: int
    closed_at: float | None
    summary: dict[str, Any] | None


@dataclass(frozen=True)
class UpdateRecord:
    round_id: int
    client_id: str
    family: str
    tier: str
    num_samples: int
    sha256: str
    nbytes: int
    metrics: dict[str, float]
