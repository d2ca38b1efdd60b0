"""The Flower strategy's own checkpoint: Flower has no run resume, so we keep ours.

After every round the strategy writes ``models.safetensors`` (every stored model: the global
branch and each family's bundle, keyed ``<model>::<tensor>``) and then ``strategy.json``
(round, model versions, pinned family specs, the error-feedback bookkeeping: the last round of
each client that was aggregated, and the per-round history). Both are written atomically
(write, fsync, rename) and ``strategy.json`` names the sha256 of the tensor file it belongs
to, so a crash between the two writes leaves the previous round's checkpoint readable and a
mismatched pair is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from edgetune.client.state import atomic_write
from edgetune.errors import EdgeTuneError
from edgetune.sim.flower.convert import flatten_state, unflatten_state
from edgetune.strategies.aggregation import TensorDict

MODELS_FILE = "models.safetensors"
STATE_FILE = "strategy.json"


@dataclass
class Checkpoint:
    """What a restarted strategy needs to continue after ``round``."""

    round: int = 0
    strategy: str = ""
    models: dict[str, TensorDict] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    specs: dict[str, str] = field(default_factory=dict)  # family -> pinned AdapterSpec JSON
    accepted: dict[str, int] = field(default_factory=dict)  # client -> last aggregated round
    history: list[dict[str, Any]] = field(default_factory=list)


def save_checkpoint(folder: Path, ckpt: Checkpoint) -> None:
    """Tensors first, then the JSON that commits them."""
    folder.mkdir(parents=True, exist_ok=True)
    flat = {k: t.detach().contiguous() for k, t in flatten_state(ckpt.models).items()}
    data = save_tensors(flat)
    atomic_write(folder / MODELS_FILE, data)
    doc = {
        "round": ckpt.round,
        "strategy": ckpt.strategy,
        "models_sha256": hashlib.sha256(data).hexdigest(),
        "versions": ckpt.versions,
        "specs": ckpt.specs,
        "accepted": ckpt.accepted,
        "history": ckpt.history,
    }
    atomic_write(folder / STATE_FILE, json.dumps(doc, indent=1).encode())


def load_checkpoint(folder: Path) -> Checkpoint | None:
    """The checkpoint in ``folder``, or None when there is none; a damaged one raises."""
    state, models = folder / STATE_FILE, folder / MODELS_FILE
    if not state.is_file():
        return None
    try:
        doc = json.loads(state.read_text())
        data = models.read_bytes()
    except (OSError, json.JSONDecodeError) as err:
        raise EdgeTuneError(f"{folder}: unreadable Flower checkpoint ({err})") from err
    if hashlib.sha256(data).hexdigest() != doc.get("models_sha256"):
        raise EdgeTuneError(f"{models} does not match {state}; restore both or remove both")
    return Checkpoint(
        round=int(doc["round"]),
        strategy=str(doc.get("strategy", "")),
        models=unflatten_state(load_tensors(data)),
        versions={k: int(v) for k, v in doc["versions"].items()},
        specs=dict(doc["specs"]),
        accepted={k: int(v) for k, v in doc["accepted"].items()},
        history=list(doc.get("history", [])),
    )
