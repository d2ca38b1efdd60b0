"""The `edgetune` command: one subcommand per job, each registered by the room that owns it.

Every room's `cli` module only builds its argparse parser and imports its heavy parts (torch,
transformers, onnxruntime) inside the command, so `edgetune --help` loads no torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from edgetune import __version__
from edgetune.errors import EdgeTuneError

#: The modules whose ``register_cli(subparsers)`` add the subcommands, in help order.
COMMAND_MODULES = (
    "edgetune.sim.cli",  # simulate, demo
    "edgetune.server.cli",  # server
    "edgetune.client.cli",  # client
    "edgetune.models.cli",  # zoo
    "edgetune.data.cli",  # data
    "edgetune.measure.cli",  # profile
    "edgetune.onnx.cli",  # export, infer
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgetune", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"edgetune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    try:
        return int(args.func(args) or 0)
    except EdgeTuneError as err:
        print(f"edgetune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
