"""`edgetune client`: run one client against a server (also `python -m edgetune.client.cli`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from edgetune.client.runtime import KINDS, ClientRuntime, ClientSettings, ShardSpec
from edgetune.config import AdapterConfig, LoraConfig, TrainConfig
from edgetune.errors import ConfigError, EdgeTuneError

JOIN_TOKEN_ENV = "EDGETUNE_JOIN_TOKEN"


def settings_from_dict(raw: dict[str, Any]) -> ClientSettings:
    """The JSON the simulation writes per client -> validated settings."""
    raw = dict(raw)
    try:
        adapter = raw.pop("adapter", {})
        adapter = {k: tuple(v) if isinstance(v, list) else v for k, v in adapter.items()}
        lora = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.pop("lora", {}).items()}
        shard = raw.pop("shard")
        shard["categories"] = tuple(shard.get("categories", ()))
        return ClientSettings(
            adapter=AdapterConfig(**adapter),
            lora=LoraConfig(**lora),
            train=TrainConfig(**raw.pop("train", {})),
            shard=ShardSpec(**shard),
            state_dir=Path(raw.pop("state_dir")),
            **raw,
        )
    except (KeyError, TypeError) as err:
        raise ConfigError(f"client settings are incomplete or have unknown keys: {err}") from err


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", type=Path, help="a settings JSON file (as `simulate` writes)")
    p.add_argument("--result", type=Path, help="write the final metrics as JSON here")
    p.add_argument("--server", help="server URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--join-token", help=f"join token (default: env {JOIN_TOKEN_ENV})")
    p.add_argument("--backbone", default="minilm-l3")
    p.add_argument("--quant", default="none", choices=("none", "int8", "nf4", "fp4"))
    p.add_argument("--kind", default="fedadapter", choices=KINDS)
    p.add_argument("--data", default="fortunes", help="dataset name or .csv/.jsonl file")
    p.add_argument("--state-dir", type=Path, default=Path("edgetune-client"))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--time-budget", type=float, default=0.0, help="seconds of training per round")
    p.add_argument("--max-rounds", type=int, default=0)


def _settings_from_flags(args: argparse.Namespace) -> ClientSettings:
    token = args.join_token or os.environ.get(JOIN_TOKEN_ENV)
    if not args.server or not token:
        raise ConfigError(f"--server and --join-token (or env {JOIN_TOKEN_ENV}) are required")
    return ClientSettings(
        server=args.server,
        join_token=token,
        backbone=args.backbone,
        quant=args.quant,
        tier=args.quant,
        kind=args.kind,
        state_dir=args.state_dir,
        shard=ShardSpec(dataset=args.data, local_holdout=0.2),
        adapter=AdapterConfig(rank=args.rank),
        lora=LoraConfig(rank=args.rank),
        train=TrainConfig(
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            time_budget_s=args.time_budget,
        ),
        max_rounds=args.max_rounds,
    )


def run_client(args: argparse.Namespace) -> int:
    if args.settings:
        settings = settings_from_dict(json.loads(args.settings.read_text()))
    else:
        settings = _settings_from_flags(args)
    torch.manual_seed(settings.train.seed)
    result = ClientRuntime(settings).run()
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
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    try:
        return run_client(args)
    except EdgeTuneError as err:
        print(f"edgetune client: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
