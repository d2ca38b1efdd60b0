"""The offline switches every Flower process of ours runs with (no flwr import here).

Flower phones home (telemetry, update checks) and by default installs an app's dependencies
into a fresh environment before every run (``uv sync``), which fails offline and would
replace our torch; Ray reports usage statistics. All of that is switched off here, and Ray is
kept on loopback. `apply_offline_env` sets what the caller has not set itself.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

#: Switches that must hold whatever the caller set (they keep runs offline).
FORCED = ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK", "RAY_USAGE_STATS_ENABLED")


def apply_offline_env(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Set the offline switches in ``env`` (default ``os.environ``); returns it."""
    target = os.environ if env is None else env
    for key, value in OFFLINE_ENV.items():
        if key in FORCED:
            target[key] = value
        else:
            target.setdefault(key, value)
    return target


def export_lines() -> str:
    """The switches as shell ``export`` lines (for the README and the generated app)."""
    return "\n".join(f"export {k}={v}" for k, v in OFFLINE_ENV.items())
