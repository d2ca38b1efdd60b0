"""``python -m edgetune.sim.flower app --config run.toml --out runs/fl DIR``: write a Flower
app folder for SuperLink/SuperNode deployment (`edgetune.sim.flower.app`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgetune.errors import EdgeTuneError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgetune.sim.flower", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    app = sub.add_parser("app", help="write a Flower app folder that runs EdgeTune")
    app.add_argument("folder", type=Path, help="the app folder to write")
    app.add_argument("--config", type=Path, required=True, help="the run config (TOML)")
    app.add_argument("--out", type=Path, required=True, help="where the ServerApp writes")
    args = parser.parse_args(argv)
    try:
        from edgetune.sim.flower.app import write_app

        path = write_app(args.folder, args.config, args.out)
    except (EdgeTuneError, OSError) as err:
        print(f"edgetune flower: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path} and {path.parent / 'commands.sh'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
