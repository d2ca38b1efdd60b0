"""TOML reading (``tomllib``, or ``tomli`` on Python 3.10) and ``--set section.key=value``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgetune.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (JetPack 6): the backport, declared in pyproject.toml
    import tomli as tomllib

__all__ = ["apply_override", "parse_override", "read_toml", "tomllib"]


def read_toml(path: str | Path) -> dict[str, Any]:
    """The tables of a TOML file (or of a ``.json`` file holding the same tables, as
    `simulate` writes them); a missing or malformed file is a ConfigError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        if Path(path).suffix == ".json":
            tables = json.loads(text)
            if not isinstance(tables, dict):
                raise ConfigError(f"{path}: a JSON config must be an object of tables")
            return tables
        return tomllib.loads(text)
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} does not exist") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from err


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (path, value); values parse as TOML, bare words as strings."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=0.001")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.strip().split("."), parsed


def apply_override(raw: dict[str, Any], text: str) -> None:
    """Set one ``--set`` override in the raw tables (sections are created as needed)."""
    keys, value = parse_override(text)
    target = raw
    for part in keys[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"--set {text!r}: {part} is not a section")
    target[keys[-1]] = value
