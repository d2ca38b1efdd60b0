"""Check the demo's acceptance on finished runs (issue 7), and print the numbers.

    python bench/check_demo.py runs/demo runs/local

- every family's global-model test accuracy after the last round beats round 0 by >= 20 points;
- the MiniLM-L3 family (global model, and its clients' personalised models) beats the same
  family trained local-only (mean test accuracy of its clients' own models).
Exit status 1 when a condition fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def check(fed_dir: Path, local_dir: Path, family: str = "minilm-l3", gain: float = 0.20) -> bool:
    fed = json.loads((fed_dir / "summary.json").read_text())
    local = json.loads((local_dir / "summary.json").read_text())
    ok = True
    for fam, start in fed["initial_global_acc"].items():
        end = fed["final_global_acc"][fam]
        passed = end - start >= gain
        ok &= passed
        print(
            f"{fam}: global {100 * start:.1f}% -> {100 * end:.1f}% "
            f"({100 * (end - start):+.1f} points) {'ok' if passed else 'FAIL'}"
        )
    local_acc = local["final_personal_test_acc"][family]
    for label, acc in (
        ("global model", fed["final_global_acc"][family]),
        ("personalised", fed["final_personal_test_acc"][family]),
    ):
        passed = acc > local_acc
        ok &= passed
        print(
            f"{family} {label} {100 * acc:.1f}% vs local-only {100 * local_acc:.1f}% "
            f"{'ok' if passed else 'FAIL'}"
        )
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("fed_dir", type=Path, help="output folder of the federated run")
    p.add_argument("local_dir", type=Path, help="output folder of the local-only run")
    p.add_argument("--family", default="minilm-l3", help="family compared with local-only")
    p.add_argument("--gain", type=float, default=0.20, help="required accuracy gain (0..1)")
    args = p.parse_args(argv)
    return 0 if check(args.fed_dir, args.local_dir, args.family, args.gain) else 1


if __name__ == "__main__":
    sys.exit(main())
