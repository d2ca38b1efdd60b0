"""The machine and provenance record every benchmark writes into its JSON (DESIGN section 9).

`machine_info(watched)` gives CPU model, cores, GPU, Python / torch / platform versions, the git
commit, whether the measured files (`watched`) differ from that commit, and the 1-minute load
average at the start (absolute times on a shared machine drift with it). Each benchmark adds
the versions of the libraries it measures.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def cpu_model() -> str:
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def machine_info(
    watched: Sequence[str], dirty_key: str = "measured_files_dirty", untracked: bool = True
) -> dict[str, Any]:
    """The shared record; `dirty_key` is true when `watched` paths differ from HEAD
    (`untracked=False` ignores files git does not track)."""
    status = ["status", "--porcelain"] + ([] if untracked else ["-uno"])
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "git_commit": _git("rev-parse", "HEAD") or f"not a git checkout: {ROOT}",
        dirty_key: bool(_git(*status, "--", *watched)),
        "loadavg_1m_at_start": os.getloadavg()[0],
    }


def write_results(name: str, result: dict[str, Any], markdown: list[str]) -> None:
    """``bench/results/<name>.json`` (indented) and ``<name>.md`` (the lines), and the lines
    printed."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{name}.md").write_text("\n".join(markdown) + "\n")
    print("\n".join(markdown))
