"""`edgetune client`: run one client against a server (also `python -m edgetune.client`).

The client reads the same run config as `simulate` and `server` (``--config run.toml``, the
``[client]`` section says which backbone, shard and server); each flag below is a shorthand for
one ``--set`` key, and ``--set`` overrides anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetune.errors import ConfigError, EdgeTuneError

if TYPE_CHECKING:
    from edgetune.config import RunConfig

JOIN_TOKEN_ENV = "EDGETUNE_JOIN_TOKEN"

#: flag -> the config key it sets
FLAG_KEYS = {
    "server": "client.url",
    "ca_cert": "client.ca_cert",
    "backbone": "client.backbone",
    "quant": "client.quant",
    "rank": "client.rank",
    "state_dir": "client.state_dir",
    "max_rounds": "client.max_rounds",
    "strategy": "strategy",
    "data": "data.dataset",
    "epochs": "train.epochs",
    "lr": "train.lr",
    "batch_size": "train.batch_size",
    "time_budget": "train.time_budget_s",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        help="run config (TOML, or JSON of the same tables; default: built-in defaults)",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. client.quant=nf4 (default: none)")  # fmt: skip
    p.add_argument("--join-token", help=f"join token (default: env {JOIN_TOKEN_ENV})")
    p.add_argument(
        "--result", type=Path, help="write the final metrics as JSON here (default: not written)"
    )
    p.add_argument(
        "--server", help="server URL, e.g. http://127.0.0.1:8080 (default: the config's client.url)"
    )
    p.add_argument(
        "--ca-cert",
        help="CA certificate (PEM) of an https server (default: the config's client.ca_cert)",
    )
    p.add_argument(
        "--backbone", help="zoo name or model folder (default: the config's client.backbone)"
    )
    p.add_argument("--quant", help="none, int8, nf4 or fp4 (default: the config's client.quant)")
    p.add_argument("--strategy", help="the run's strategy (default: the config's strategy)")
    p.add_argument(
        "--data", help="dataset name or .csv/.jsonl file (default: the config's data.dataset)"
    )
    p.add_argument(
        "--state-dir",
        help="where the client keeps its state (default: the config's client.state_dir)",
    )
    p.add_argument(
        "--rank", type=int, help="this client's adapter rank (default: the config's client.rank)"
    )
    p.add_argument(
        "--epochs", type=int, help="local epochs per round (default: the config's train.epochs)"
    )
    p.add_argument("--lr", type=float, help="learning rate (default: the config's train.lr)")
    p.add_argument(
        "--batch-size", type=int, help="local batch size (default: the config's train.batch_size)"
    )
    p.add_argument(
        "--time-budget",
        type=float,
        help="seconds of training per round (default: the config's train.time_budget_s)",
    )
    p.add_argument(
        "--max-rounds",
        type=int,
        help="stop after this many rounds (default: the config's client.max_rounds)",
    )


def register_cli(sub: Any) -> None:
    """Add ``edgetune client``."""
    client = sub.add_parser("client", help="run one federated client against a server")
    add_arguments(client)
    client.set_defaults(func=run_client)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config: file < flags < ``--set``; the server URL is required."""
    from edgetune.config import load_config

    flags = []
    for attr, key in FLAG_KEYS.items():
        value = getattr(args, attr, None)
        if value is not None:
            flags.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    config = load_config(args.config, [*flags, *args.overrides])
    if not config.client.url and config.strategy_def.federated:
        raise ConfigError("client.url is empty: pass --server http://HOST:PORT")
    return config


def join_token_of(args: argparse.Namespace) -> str:
    token = args.join_token or os.environ.get(JOIN_TOKEN_ENV, "")
    if not token:
        raise ConfigError(f"no join token: pass --join-token or set {JOIN_TOKEN_ENV}")
    return token


def run_client(args: argparse.Namespace) -> int:
    import torch

    from edgetune.client.runtime import ClientRuntime

    config = config_from_args(args)
    token = join_token_of(args) if config.strategy_def.federated else ""
    torch.manual_seed(config.train.seed)
    result = ClientRuntime(config, token).run()
    text = json.dumps(result, indent=1, default=float)
    if args.result:
        args.result.write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgetune client", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    try:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        return run_client(args)
    except EdgeTuneError as err:
        print(f"edgetune client: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
