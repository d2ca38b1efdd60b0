"""ServerConfig validation, TOML + --set loading, and the CLI surface."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from edgetune.server.cli import (
    JsonFormatter,
    read_join_token,
    register_cli,
    run_from_args,
    tls_warning,
)
from edgetune.server.config import ConfigError, ServerConfig, load_config, parse_override


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        ({"strategy": "fedprox"}, "strategy='fedprox'"),
        ({"beta": 1.5}, "beta=1.5"),
        ({"min_clients": 0}, "min_clients=0"),
        ({"min_clients": 2, "min_clients_at_deadline": 3}, "min_clients_at_deadline=3"),
        ({"port": 70000}, "port=70000"),
        ({"on_deadline": "retry"}, "on_deadline='retry'"),
        ({"eta": "fast"}, "eta='fast'"),
        ({"project_conflicts": "yes"}, "project_conflicts='yes'"),
        ({"min_clients": True}, "min_clients=True"),
    ],
)
def test_bad_values_are_named(kw: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace("[", r"\[")):
        ServerConfig(**kw)


def test_toml_then_overrides_then_explicit(tmp_path: Path) -> None:
    cfg_file = tmp_path / "server.toml"
    cfg_file.write_text(
        'strategy = "flexlora"\nmin_clients = 4\nbeta = 0.2\nallowed_dtypes = ["float32"]\n'
    )
    cfg = load_config(
        cfg_file, ["beta=0.7", "project_conflicts=true", "strategy=fedavg"], port=9000, host=None
    )
    assert (cfg.strategy, cfg.min_clients, cfg.beta, cfg.project_conflicts) == (
        "fedavg",
        4,
        0.7,
        True,
    )
    assert cfg.port == 9000 and cfg.host == "127.0.0.1" and cfg.allowed_dtypes == ("float32",)
    assert parse_override("eta=2") == ("eta", 2)
    with pytest.raises(ConfigError, match="unknown config keys"):
        load_config(None, ["min_client=3"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("min_clients")
    (tmp_path / "nested.toml").write_text("[server]\nport = 1\n")
    with pytest.raises(ConfigError, match="flat"):
        load_config(tmp_path / "nested.toml")


def test_tls_warning_only_beyond_loopback_without_tls() -> None:
    assert tls_warning(ServerConfig(host="127.0.0.1"), tls=False) is None
    assert tls_warning(ServerConfig(host="0.0.0.0"), tls=True) is None
    warning = tls_warning(ServerConfig(host="0.0.0.0"), tls=False)
    assert warning is not None and "without TLS" in warning


def test_join_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGETUNE_JOIN_TOKEN", "env-token-0123456789")
    assert read_join_token(None) == "env-token-0123456789"
    f = tmp_path / "tok"
    f.write_text("file-token-0123456789\n")
    assert read_join_token(f) == "file-token-0123456789"
    monkeypatch.setenv("EDGETUNE_JOIN_TOKEN", "short")
    with pytest.raises(ConfigError, match="EDGETUNE_JOIN_TOKEN"):
        read_join_token(None)


def test_register_cli_adds_server_subcommand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = argparse.ArgumentParser(prog="edgetune")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["server", "--state", str(tmp_path), "--set", "beta=2.0"])
    assert args.func is run_from_args and args.overrides == ["beta=2.0"]
    monkeypatch.setenv("EDGETUNE_JOIN_TOKEN", "env-token-0123456789")
    assert args.func(args) == 2  # beta=2.0 is rejected before anything starts
    assert not (tmp_path / "server.sqlite3").exists()


def test_module_entry_point_rejects_missing_token(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "EDGETUNE_JOIN_TOKEN": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "edgetune.server", "--state", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2 and "join token" in proc.stderr


def test_json_log_lines() -> None:
    rec = logging.LogRecord(
        "edgetune.server", logging.INFO, __file__, 1, "round_closed", None, None
    )
    rec.event, rec.fields = "round_closed", {"round": 3, "updates": 5}
    line = json.loads(JsonFormatter().format(rec))
    assert line["event"] == "round_closed" and line["round"] == 3 and line["level"] == "info"
