"""``edgetune server``: run the aggregation server (also ``python -m edgetune.server``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import ssl
import sys
from pathlib import Path
from typing import Any

from edgetune.config import RunConfig, ServerConfig, load_config
from edgetune.errors import ConfigError

log = logging.getLogger("edgetune.server")
JOIN_TOKEN_ENV = "EDGETUNE_JOIN_TOKEN"
MIN_JOIN_TOKEN_CHARS = 16


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, message and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", None) or record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("edgetune", "uvicorn", "uvicorn.error"):  # uvicorn's own lines as JSON too
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state", required=True, type=Path, help="state directory (created; resumed if present)"
    )
    p.add_argument(
        "--host", default=None, help="bind address (default: the config's server.host, 127.0.0.1)"
    )
    p.add_argument(
        "--port", type=int, default=None, help="port (default: the config's server.port, 8080)"
    )
    p.add_argument(
        "--config", type=Path, default=None,
        help="run config, the same TOML as simulate (default: built-in defaults)",
    )  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. server.min_clients=3 (default: none)")  # fmt: skip
    p.add_argument("--join-token-file", type=Path, default=None,
                   help=f"file holding the join token (default: env {JOIN_TOKEN_ENV})")  # fmt: skip
    p.add_argument(
        "--certfile",
        type=Path,
        default=None,
        help="TLS certificate (PEM; default: none, plain HTTP)",
    )
    p.add_argument(
        "--keyfile",
        type=Path,
        default=None,
        help="TLS private key (PEM; default: none, plain HTTP)",
    )


def register_cli(subparsers: Any) -> None:
    """Add the ``server`` subcommand to the ``edgetune`` CLI; it runs via ``args.func(args)``."""
    p = subparsers.add_parser("server", help="run the aggregation server", description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run_from_args)


def read_join_token(path: Path | None) -> str:
    if path is not None:
        try:
            token = path.read_text().strip()
        except FileNotFoundError as exc:
            raise ConfigError(f"join token file {path} does not exist") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"join token file {path} cannot be read: {exc}") from exc
        source = str(path)
    else:
        token = os.environ.get(JOIN_TOKEN_ENV, "").strip()
        source = JOIN_TOKEN_ENV
    if len(token) < MIN_JOIN_TOKEN_CHARS:
        raise ConfigError(
            f"join token from {source} is missing or shorter than {MIN_JOIN_TOKEN_CHARS} characters; "
            f"set {JOIN_TOKEN_ENV} or pass --join-token-file"
        )
    return token


def tls_warning(config: ServerConfig, tls: bool) -> str | None:
    """The start-up warning for a non-loopback listener without TLS, else None."""
    if config.is_loopback or tls:
        return None
    return (
        f"listening on {config.host}:{config.port} without TLS: bearer tokens and updates travel "
        "in clear text; pass --certfile/--keyfile or bind 127.0.0.1 behind a TLS proxy"
    )


def run_from_args(args: argparse.Namespace) -> int:
    try:
        flags = [f"server.host={args.host!r}"] if args.host else []
        flags += [f"server.port={args.port}"] if args.port is not None else []
        run = load_config(args.config, [*flags, *args.overrides])
        check_servable(run)
        token = read_join_token(args.join_token_file)
        if (args.certfile is None) != (args.keyfile is None):
            raise ConfigError("--certfile and --keyfile must be given together")
        if args.certfile is not None:
            check_tls(args.certfile, args.keyfile)
    except (ConfigError, OSError) as exc:
        print(f"edgetune server: {exc}", file=sys.stderr)
        return 2
    setup_logging(run.server.log_level)
    return serve(run, args.state, token, args.certfile, args.keyfile)


def check_tls(certfile: Path, keyfile: Path) -> None:
    """Load the certificate and key once before serving: a mistake is one line, not a
    traceback from inside uvicorn."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(certfile), str(keyfile))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"TLS certificate {certfile} / key {keyfile} unusable: {exc}") from exc


def check_servable(run: RunConfig) -> None:
    """What only the whole config can say: the strategy has a server side, and the quorum is
    countable (``server.min_clients = 0`` needs [[group]] tables)."""
    run.strategy_def.server_class()
    _ = run.quorum  # raises when server.min_clients = 0 has no [[group]] tables to count


def serve(
    run: RunConfig, state: Path, join_token: str, certfile: Path | None, keyfile: Path | None
) -> int:
    import uvicorn

    from .app import create_app
    from .connections import with_header_deadline
    from .rounds import Coordinator
    from .storage import Storage

    config = run.server

    if config.torch_threads:
        # aggregation is memory-bound; one thread avoids OpenMP stalls when the cores are shared
        import torch

        torch.set_num_threads(config.torch_threads)
    warning = tls_warning(config, certfile is not None)
    if warning:
        log.warning(warning, extra={"event": "insecure_listener"})
    storage = Storage(state, synchronous=config.sqlite_synchronous, fsync_blobs=config.fsync_blobs)
    coord = Coordinator(run, storage, join_token)
    rec = coord.current_round()
    log.info("server starting", extra={"event": "server_start", "fields": {
        "host": config.host, "port": config.port, "state": str(state), "strategy": run.strategy,
        "round": rec.round_id, "round_state": rec.state, "tls": certfile is not None}})  # fmt: skip
    uv = uvicorn.Config(
        create_app(coord),
        host=config.host,
        port=config.port,
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
        log_level=config.log_level.lower(),
        log_config=None,  # keep the JSON handlers installed by setup_logging
        access_log=False,
        timeout_graceful_shutdown=5,
        http=with_header_deadline(config.header_timeout_s),
    )
    uvicorn.Server(uv).run()
    storage.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgetune.server", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
