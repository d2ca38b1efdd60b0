"""The server's config (the shared run config), TOML + --set loading, and the CLI surface."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from edgetune.config import ServerConfig, load_config, parse_override
from edgetune.errors import ConfigError
from edgetune.server.cli import (
    JsonFormatter,
    read_join_token,
    register_cli,
    run_from_args,
    tls_warning,
)


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        (["strategy=fedprox"], "strategy='fedprox'"),
        (["server.beta=1.5"], "server.beta=1.5"),
        (["server.min_clients=-1"], "server.min_clients=-1"),
        (["server.min_clients=2", "server.min_clients_at_deadline=3"], "min_clients_at_deadline=3"),
        (["server.port=70000"], "server.port=70000"),
        (["server.on_deadline=retry"], "server.on_deadline='retry'"),
        (["server.eta=fast"], "server.eta='fast'"),
        (["server.project_conflicts=yes"], "server.project_conflicts='yes'"),
        (["server.min_clients=true"], "server.min_clients=True"),
        (["server.min_client=3"], "unknown key"),
    ],
)
def test_bad_values_are_named(keys: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, keys)


def test_the_server_reads_the_run_config_of_simulate(tmp_path: Path) -> None:
    """One file for every side: the same sections, then --set overrides on top."""
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text(
        'strategy = "flexlora"\nrounds = 3\n[server]\nmin_clients = 4\nbeta = 0.2\n'
        'allowed_dtypes = ["float32"]\n[[group]]\nbackbone = "minilm-l3"\ncount = 6\n'
    )
    run = load_config(
        cfg_file, ["server.beta=0.7", "server.project_conflicts=true", "strategy=fedavg-lora"]
    )
    assert (run.strategy, run.rounds, run.server.min_clients, run.quorum) == (
        "fedavg-lora",
        3,
        4,
        4,
    )
    assert (run.server.beta, run.server.project_conflicts) == (0.7, True)
    assert run.server.host == "127.0.0.1" and run.server.allowed_dtypes == ("float32",)
    assert load_config(cfg_file, ["server.min_clients=0"]).quorum == 6  # 0: every declared client
    assert parse_override("server.eta=2") == (["server", "eta"], 2)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("server.min_clients")
    (tmp_path / "flat.toml").write_text("min_clients = 1\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(tmp_path / "flat.toml")


def test_quorum_zero_without_groups_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"server\.min_clients=0 means every client"):
        _ = load_config(None, []).quorum


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
    args = parser.parse_args(["server", "--state", str(tmp_path), "--set", "server.beta=2.0"])
    assert args.func is run_from_args and args.overrides == ["server.beta=2.0"]
    monkeypatch.setenv("EDGETUNE_JOIN_TOKEN", "env-token-0123456789")
    assert args.func(args) == 2  # server.beta=2.0 is rejected before anything starts
    assert not (tmp_path / "server.sqlite3").exists()


def test_module_entry_point_rejects_missing_token(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "EDGETUNE_JOIN_TOKEN": ""}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgetune.server",
            "--state",
            str(tmp_path / "s"),
            "--set",
            "server.min_clients=2",
        ],
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
