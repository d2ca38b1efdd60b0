"""Typed server configuration: a flat-key TOML file plus ``--set key=value`` overrides."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (Jetson) ships tomli instead
    import tomli as tomllib

STRATEGIES = ("fedadapter", "fedavg", "hetlora", "flexlora", "flora")
DEADLINE_POLICIES = ("extend", "abandon")
SYNC_MODES = ("NORMAL", "FULL", "EXTRA")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class ConfigError(ValueError):
    """A configuration value that is out of range or of the wrong type."""


@dataclass
class ServerConfig:
    """All server settings; every value is checked in ``__post_init__``."""

    host: str = "127.0.0.1"
    port: int = 8080
    strategy: str = "fedadapter"
    min_clients: int = 2
    min_clients_at_deadline: int = 1
    round_timeout_s: float = 600.0
    on_deadline: str = "extend"
    max_extensions: int = 3
    max_rounds: int = 0  # 0 = unlimited
    beta: float = 0.5
    eta: float = 1.0
    project_conflicts: bool = False
    seed: int = 0
    max_upload_bytes: int = 64 * 1024 * 1024
    max_num_samples: int = 100_000_000
    allowed_dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")
    tick_s: float = 0.25
    sqlite_synchronous: str = "FULL"
    fsync_blobs: bool = True
    torch_threads: int = 1  # intra-op threads for aggregation; 0 = torch's default
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        _check_types(self)
        _require(self.strategy in STRATEGIES, "strategy", self.strategy, f"one of {STRATEGIES}")
        _require(
            self.on_deadline in DEADLINE_POLICIES,
            "on_deadline",
            self.on_deadline,
            f"one of {DEADLINE_POLICIES}",
        )
        _require(0 <= self.port <= 65535, "port", self.port, "in 0..65535")
        _require(self.min_clients >= 1, "min_clients", self.min_clients, ">= 1")
        ok = 1 <= self.min_clients_at_deadline <= self.min_clients
        _require(ok, "min_clients_at_deadline", self.min_clients_at_deadline, "in 1..min_clients")
        _require(self.round_timeout_s > 0, "round_timeout_s", self.round_timeout_s, "> 0")
        _require(self.max_extensions >= 0, "max_extensions", self.max_extensions, ">= 0")
        _require(self.max_rounds >= 0, "max_rounds", self.max_rounds, ">= 0")
        _require(0.0 <= self.beta <= 1.0, "beta", self.beta, "in [0, 1]")
        _require(self.eta > 0, "eta", self.eta, "> 0")
        _require(
            self.max_upload_bytes >= 1024, "max_upload_bytes", self.max_upload_bytes, ">= 1024"
        )
        _require(self.max_num_samples >= 1, "max_num_samples", self.max_num_samples, ">= 1")
        bad = [d for d in self.allowed_dtypes if d not in ("float32", "float16", "bfloat16")]
        _require(
            not bad and bool(self.allowed_dtypes),
            "allowed_dtypes",
            self.allowed_dtypes,
            "float dtypes",
        )
        _require(0 < self.tick_s <= 10, "tick_s", self.tick_s, "in (0, 10]")
        _require(
            self.sqlite_synchronous in SYNC_MODES,
            "sqlite_synchronous",
            self.sqlite_synchronous,
            str(SYNC_MODES),
        )
        _require(bool(self.host), "host", self.host, "non-empty")
        _require(0 <= self.torch_threads <= 256, "torch_threads", self.torch_threads, "in 0..256")

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ServerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known: {sorted(known)}")
        values = dict(data)
        if isinstance(values.get("allowed_dtypes"), list):
            values["allowed_dtypes"] = tuple(values["allowed_dtypes"])
        return cls(**values)


def _require(ok: bool, name: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} must be {what}")


def _check_types(cfg: ServerConfig) -> None:
    hints = {"int": int, "float": (int, float), "str": str, "bool": bool}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        expected = hints.get(str(f.type))
        if expected is None:  # tuple[str, ...]
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{f.name}={value!r} must be a list of strings")
            continue
        if isinstance(value, bool) and f.type != "bool":
            raise ConfigError(f"{f.name}={value!r} must be {f.type}, not bool")
        if not isinstance(value, expected):
            raise ConfigError(f"{f.name}={value!r} must be {f.type}")
        if f.type == "float":
            setattr(cfg, f.name, float(value))


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as TOML (``beta=0.3``, ``project_conflicts=true``);
    a value that is not valid TOML is taken as a bare string (``strategy=fedavg``)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r} must look like key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    **explicit: Any,
) -> ServerConfig:
    """Defaults < TOML file (flat keys) < ``--set`` overrides < explicit keyword values."""
    data: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as fh:
            try:
                loaded = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
        nested = [k for k, v in loaded.items() if isinstance(v, dict)]
        if nested:
            raise ConfigError(f"{path}: config keys are flat; tables {nested} are not allowed")
        data.update(loaded)
    data.update(parse_override(item) for item in overrides)
    data.update({k: v for k, v in explicit.items() if v is not None})
    return ServerConfig.from_mapping(data)
