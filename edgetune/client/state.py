"""A client's state directory: everything it needs to continue after a crash.

``client.json`` (id, token, last finished round, versions) is written last, so it commits the
round; ``adapter.safetensors`` holds every adapter tensor (the private branch included),
``error_feedback.safetensors`` the int8 residuals and ``strategy.safetensors`` what the
strategy keeps between rounds. Every file is written atomically (write, fsync, rename).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save
from torch import Tensor

from edgetune.errors import ConfigError

STATE_FILE = "client.json"
ADAPTER_FILE = "adapter.safetensors"
FEEDBACK_FILE = "error_feedback.safetensors"
STRATEGY_FILE = "strategy.safetensors"
ROUNDS_LOG = "rounds.jsonl"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash leaves the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class StateDir:
    """Reads and writes the files of one client's state directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

    def read_state(self) -> dict[str, Any]:
        """The committed state (``{"last_round": 0}`` for a new client)."""
        path = self.path(STATE_FILE)
        if not path.is_file():
            return {"last_round": 0}
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: unreadable client state ({err}); move the folder") from err

    def write_state(self, state: dict[str, Any]) -> None:
        atomic_write(self.path(STATE_FILE), json.dumps(state, indent=1).encode())

    def read_tensors(self, name: str) -> dict[str, Tensor] | None:
        path = self.path(name)
        return load_file(str(path)) if path.is_file() else None

    def write_tensors(
        self, name: str, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
    ) -> None:
        contiguous = {n: t.detach().contiguous() for n, t in tensors.items()}
        atomic_write(self.path(name), save(contiguous, metadata=metadata))

    def log_round(self, line: dict[str, Any]) -> None:
        """Append one JSON line per finished round (the simulation reads these)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self.path(ROUNDS_LOG).open("a") as handle:
            handle.write(json.dumps(line) + "\n")
