"""`edgetune simulate` and `edgetune demo` (simulate on the embedded default config)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

DEMO_CONFIG = Path(__file__).parents[1] / "configs" / "demo.toml"
ENGINES = ("edgetune", "flower")


def register_cli(sub: Any) -> None:
    simulate = sub.add_parser("simulate", help="a real server + N client processes, R rounds")
    simulate.add_argument("--config", type=Path, help="TOML config (default: the embedded demo)")
    _common(simulate, Path("runs/simulate"))
    simulate.add_argument(
        "--strategy", help="shorthand for --set strategy=NAME (default: the config's)"
    )
    simulate.add_argument("--engine", choices=ENGINES, default=ENGINES[0],
                          help="edgetune: our server + client processes over loopback HTTP "
                          "(default); flower: Flower's simulation engine, one virtual "
                          "SuperNode per client (needs edgetune[flower])")  # fmt: skip
    simulate.set_defaults(func=_cmd_simulate)
    demo = sub.add_parser("demo", help="run the main job on the embedded default config")
    _common(demo, Path("runs/demo"))
    # the embedded job replaces its own previous results (make demo stays re-runnable)
    demo.set_defaults(func=_cmd_demo, config=None, strategy=None, engine="edgetune")


def _common(parser: argparse.ArgumentParser, out: Path) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key (repeatable), e.g. train.lr=0.001 (default: none)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=out, help=f"output folder (default: {out})")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true",
                       help="delete what --out holds first (else a used --out is refused)")  # fmt: skip
    again.add_argument("--resume", action="store_true",
                       help="continue the stopped run in --out (its config must be the same)")  # fmt: skip


def _cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default: `simulate` with configs/demo.toml."""
    return _cmd_simulate(args)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from edgetune.config import load_config
    from edgetune.errors import ConfigError
    from edgetune.sim.harness import check_runnable, prepare_out, run_simulation
    from edgetune.sim.references import run_reference

    overrides = list(args.overrides) + ([f"strategy={args.strategy}"] if args.strategy else [])
    config_file = Path(args.config or DEMO_CONFIG)
    config = load_config(config_file, overrides)
    if not config.strategy_def.reference:
        check_runnable(config)
    flower = getattr(args, "engine", ENGINES[0]) == "flower" and _flower_ready(config)
    if args.resume and flower:
        raise ConfigError("--resume continues runs of --engine edgetune only")
    overwrite = args.overwrite or (args.func is _cmd_demo and not args.resume)
    prepare_out(args.out, overwrite, config if args.resume else None)
    run = run_reference if config.strategy_def.reference else run_simulation
    if flower:
        from edgetune.sim.flower.engine import run_flower as run
    named = {} if config.strategy_def.reference else {"name": config_file.stem}
    try:
        summary = run(config, args.out, **named)
    except BaseException:
        if not args.resume and not _trained(args.out):
            shutil.rmtree(args.out, ignore_errors=True)  # nothing worth keeping
        raise
    print(json.dumps({k: v for k, v in summary.items() if k != "clients"}, indent=1))
    failed = [c["client"] for c in summary["clients"] if c["returncode"] != 0]
    finished = not config.strategy_def.federated or summary["final_round"] == config.rounds
    if not failed and finished:
        made = "summary.json" if summary.get("reference") else "metrics.jsonl, summary.json, *.png"
        print(f"outputs in {args.out}/ ({made}; final models in {args.out}/final/)")
        return 0
    return _incomplete(args.out, summary, failed, config.rounds, args.resume)


def _trained(out: Path) -> bool:
    """True once a round closed (the server wrote a final model) or a client logged a round."""
    if any(out.glob("server/final/*/adapter.safetensors")):
        return True
    return any(p.stat().st_size for p in out.glob("clients/*/rounds.jsonl"))


def _last_log_line(out: Path, client: int) -> str:
    try:
        lines = (out / "clients" / f"c{client}" / "client.log").read_text().splitlines()
    except OSError:
        return "no log"
    return next((line.strip() for line in reversed(lines) if line.strip()), "empty log")


def _incomplete(out: Path, summary: dict, failed: list[int], rounds: int, resume: bool) -> int:
    """One line for a run that did not finish; a fresh run that trained nothing is removed."""
    why = f"clients {failed} failed, last aggregated round {summary['final_round']} of {rounds}"
    if failed:
        why += f" (client {failed[0]}: {_last_log_line(out, failed[0])})"
    if not resume and not _trained(out):
        shutil.rmtree(out, ignore_errors=True)
        print(f"edgetune: error: run failed before its first round: {why}; {out} removed",
              file=sys.stderr)  # fmt: skip
    else:
        print(f"edgetune: error: run incomplete: {why}; see {out}/, continue with --resume",
              file=sys.stderr)  # fmt: skip
    return 1


def _flower_ready(config: Any) -> bool:
    """True when the run goes through Flower; a run without a server (reference rows, local
    training) has no federation to hand to an engine and runs as on the default engine."""
    from edgetune.errors import ConfigError

    if not config.strategy_def.federated:
        print(f"strategy {config.strategy!r} runs without a server: no engine is involved")
        return False
    try:
        import flwr  # noqa: F401
    except ImportError as err:
        raise ConfigError("--engine flower needs Flower: pip install 'edgetune[flower]'") from err
    return True
