"""`edgetune export` and `edgetune infer` in one call; neither loads torch to register."""

from __future__ import annotations

import argparse

from edgetune.onnx.export import register_cli as register_export
from edgetune.onnx.infer import register_cli as register_infer


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `edgetune export` and `edgetune infer`; each runs via `args.func(args)`."""
    register_export(subparsers)
    register_infer(subparsers)
