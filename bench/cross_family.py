"""Cross-family learning quality: the federated result beside its reference rows, and the
ablation of the mechanisms that carry knowledge across model families (issue 13).

    python bench/cross_family.py                       # every setting, 3 seeds (hours)
    python bench/cross_family.py --settings demo --seeds 0 --rows fedadapter probe
    python bench/cross_family.py --ablation --seeds 0  # the mechanism ablation on the demo
    python bench/cross_family.py --reuse               # rebuild the tables from finished runs

Each cell is one `edgetune simulate` run in a subprocess (same TOML, seed and split for every
row of a setting): ``fedadapter`` is the heterogeneous federation as configured, and the
reference strategies ``probe``, ``centralized``, ``homogeneous`` and ``isolated`` score each
family on the same evaluation subset. Accuracy is the global model's test accuracy per family
(mean over seeds, with the spread); "worst client" is the lowest personal test accuracy of any
client in the heterogeneous runs. Writes bench/results/cross_family.{json,md}.

Settings: the embedded demo (6 topics, alpha 0.5); a second category set at alpha 0.3; the demo
topics at alpha 0.1. Ablation variants switch one mechanism off (or on) against the recipe.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchinfo import RESULTS, machine_info, write_results

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "edgetune" / "configs" / "demo.toml"
SECOND = '["art", "work", "literature", "linux", "songs-poems", "men-women"]'

#: setting -> the --set overrides on top of the demo config.
SETTINGS: dict[str, list[str]] = {
    "demo": [],
    "second-a0.3": [f"data.categories={SECOND}", "data.alpha=0.3"],
    "demo-a0.1": ["data.alpha=0.1"],
}
ROWS = ["fedadapter", "probe", "centralized", "homogeneous", "isolated"]
#: ablation variant -> overrides on top of the demo recipe (what each switches).
ABLATION: dict[str, list[str]] = {
    "recipe": [],
    "head by gradient, not from class statistics (train.head=sgd)": ["train.head=sgd"],
    "no balanced loss (train.loss=ce)": ["train.loss=ce"],
    "no devices training a 2nd family (group.also=[])": ["@no-also"],
    "global branch frozen (server.eta=1e-6)": ["server.eta=0.000001"],
    "head also trained between statistics rounds (train.freeze_head=false)": [
        "train.freeze_head=false"
    ],
}


def _groups_without_also(config: Path) -> list[str]:
    """The --set override that drops every group's ``also`` list."""
    sys.path.insert(0, str(ROOT))
    from edgetune.config import load_config

    groups = load_config(config).groups
    tables = [
        f'{{backbone="{g.backbone}", quant="{g.quant}", count={g.count}, rank={g.rank}}}'
        for g in groups
    ]
    return [f"group=[{', '.join(tables)}]"]


def expand(sets: list[str], config: Path) -> list[str]:
    out: list[str] = []
    for s in sets:
        out += _groups_without_also(config) if s == "@no-also" else [s]
    return out


def run_cell(name: str, sets: list[str], out: Path, reuse: bool) -> dict[str, Any] | None:
    """One simulate run (skipped when ``reuse`` and its summary exists); its summary.

    ``reuse=None`` runs nothing: a cell whose run has not finished is None.
    """
    folder = out / "runs" / name
    summary = folder / "summary.json"
    if reuse is None and not summary.is_file():
        return None
    if reuse is not None and not (reuse and summary.is_file()):
        cmd = [sys.executable, "-m", "edgetune.cli", "simulate", "--config", str(DEMO)]
        cmd += ["--out", str(folder), "--overwrite"] + [a for s in sets for a in ("--set", s)]
        folder.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with (out / "runs" / f"{name}.log").open("w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if proc.returncode != 0 or not summary.is_file():
            raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {log.name}")
        print(f"{name}: {time.perf_counter() - started:.0f}s", flush=True)
    data = json.loads(summary.read_text())
    personal = [c["personal_test_acc"] for c in data["clients"] if "personal_test_acc" in c]
    return {
        "acc": data["final_global_acc"],
        "worst_client": min(personal) if personal else None,
        "wall_s": data.get("wall_time_s"),
        "mb_up_per_client_round": data.get("mb_up_per_client_round"),
        "command": "edgetune simulate " + " ".join(f"--set '{s}'" for s in sets),
    }


def mean_over_seeds(cells: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    cells = [c for c in cells if c is not None]
    if not cells:
        return None
    families = sorted({f for c in cells for f in c["acc"]})
    acc = {f: [c["acc"][f] for c in cells if f in c["acc"]] for f in families}
    worst = [c["worst_client"] for c in cells if c["worst_client"] is not None]
    return {
        "acc": {f: statistics.mean(v) for f, v in acc.items()},
        "spread": {f: (min(v), max(v)) for f, v in acc.items()},
        "worst_client": min(worst) if worst else None,
        "seeds": len(cells),
        "mb_up_per_client_round": cells[0].get("mb_up_per_client_round"),
        "command": cells[0]["command"],
    }


def run_table(args: argparse.Namespace) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for setting in args.settings:
        for row in args.rows:
            cells = [
                run_cell(
                    f"{setting}/{row}/s{seed}",
                    [*SETTINGS[setting], f"strategy={row}", f"seed={seed}"],
                    args.out,
                    args.reuse,
                )
                for seed in args.seeds
            ]
            mean = mean_over_seeds(cells)
            if mean is not None:
                table.setdefault(setting, {})[row] = mean
    return table


def run_ablation(args: argparse.Namespace) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for index, (variant, sets) in enumerate(ABLATION.items()):
        # The recipe itself is the demo setting's heterogeneous run: shared, not run twice.
        name = "demo/fedadapter/s{}" if not sets else f"ablation/v{index}/s{{}}"
        cells = [
            run_cell(name.format(seed), [*expand(sets, DEMO), f"seed={seed}"], args.out, args.reuse)
            for seed in args.seeds
        ]
        mean = mean_over_seeds(cells)
        if mean is not None:
            table[variant] = mean
    return table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _cell(row: dict[str, Any], family: str) -> str:
    if family not in row["acc"]:
        return "-"
    low, high = row["spread"][family]
    spread = f" ({_pct(low)}-{_pct(high)})" if row["seeds"] > 1 else ""
    return _pct(row["acc"][family]) + spread


def table_markdown(table: dict[str, Any]) -> list[str]:
    lines = []
    for setting, rows in table.items():
        families = sorted({f for r in rows.values() for f in r["acc"]})
        lines += ["", f"**{setting}** (mean over seeds; min-max in brackets)", ""]
        lines += [
            "| row | seeds | " + " | ".join(families) + " | worst client | MB up/client/round |"
        ]
        lines += ["|---" * (len(families) + 4) + "|"]
        for row, r in rows.items():
            cells = [_cell(r, f) for f in families]
            up = r.get("mb_up_per_client_round")
            tail = f" | {_pct(r['worst_client'])} | {'-' if up is None else f'{up:.2f}'} |"
            lines += [f"| {row} | {r['seeds']} | " + " | ".join(cells) + tail]
    return lines


def acceptance(rows: dict[str, Any], alpha_01: bool) -> dict[str, dict[str, bool]]:
    """Issue 13's acceptance points per family, from the mean rows of one setting."""
    het, out = rows.get("fedadapter"), {}
    if het is None:
        return {}
    for family, acc in het["acc"].items():
        ref = {r: rows[r]["acc"].get(family) for r in ROWS[1:] if r in rows}
        checks: dict[str, bool] = {}
        if ref.get("probe") is not None:
            margin = 0.03 if alpha_01 else 0.0
            checks["fedadapter >= probe" + (" - 3" if alpha_01 else "")] = (
                acc >= ref["probe"] - margin
            )
        if ref.get("homogeneous") is not None and not alpha_01:
            checks["within 3 of homogeneous"] = acc >= ref["homogeneous"] - 0.03
            if ref.get("isolated") is not None:
                half_gap = (ref["homogeneous"] - ref["isolated"]) / 2
                checks["beats isolated by half the gap"] = acc - ref["isolated"] >= half_gap
        if ref.get("centralized") is not None and ref.get("probe") is not None:
            checks["centralized >= probe + 2"] = ref["centralized"] >= ref["probe"] + 0.02
        out[family] = checks
    return out


def merge_tables(stored: Path, table: dict[str, Any]) -> dict[str, Any]:
    """The stored table with this run's rows replacing theirs: a run of some settings, rows or
    variants keeps the others' results (each row records its own seeds and command)."""
    merged = json.loads(stored.read_text()).get("table", {}) if stored.is_file() else {}
    for setting, rows in table.items():
        merged.setdefault(setting, {}).update(rows)
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--ablation", action="store_true", help="run the ablation instead")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs")
    parser.add_argument(
        "--no-run", action="store_true", help="only tabulate finished runs, start none"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "cross_family")
    args = parser.parse_args()
    name = "cross_family_ablation" if args.ablation else "cross_family"
    if args.no_run:
        args.reuse = None
    table = run_ablation(args) if args.ablation else run_table(args)
    if not table:
        print(f"no finished runs under {args.out}: {name}.json left as it was", file=sys.stderr)
        return 1
    table = {"ablation": table} if args.ablation else table
    merged = merge_tables(RESULTS / f"{name}.json", table)
    result: dict[str, Any] = {"machine": machine_info(["edgetune", "kernels", "server"])}
    result |= {"seeds": args.seeds, "table": merged}
    if not args.ablation:
        result["acceptance"] = {s: acceptance(r, s.endswith("a0.1")) for s, r in merged.items()}
    write_results(name, result, table_markdown(result["table"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
