"""The paper table: every strategy on the same config, seed and split, in one run.

    python bench/paper_table.py                   # small default config (below), ~30-45 min
    python bench/paper_table.py --config edgetune/configs/demo.toml   # the demo run (hours)

For each strategy of `edgetune.strategies.NAMES` (fedadapter, fedavg-lora, hetlora, flexlora,
flora, local) it runs `edgetune simulate` in a subprocess (same TOML, seed and Dirichlet split;
the federated strategies whose `rank_scope` is "client", HetLoRA and FlexLoRA, get
heterogeneous per-client ranks, see `het_groups`), then profiles one local training step of
every backbone with `edgetune.measure.profile_backbone` (exact FLOPs, peak memory) and writes
`bench/results/paper_table.json` and `bench/results/paper_table.md`.

Columns: final global-model test accuracy per family and overall (local: personal test
accuracy, there is no global model), MB uploaded per client per round (safetensors bodies as
sent, metadata included), total MB (up + down) until the overall accuracy first reaches the
target (cost-to-target), train GFLOPs per local step (batch x max_length, FlopCounterMode on the
fp32 weights: FLOPs do not depend on the weight format) and peak memory of a step.

Besides the six strategies, FedAdapter variants run on the same config: rank 16, adapters from
block 1 up (adapter.blocks = "from:1"), int8 + error feedback, the family bundle every 2
rounds (comm.family_every = 2), and both. Six + five simulations of ~2-5 min each on 2 cores; `--reuse` rebuilds the table from finished
runs under `--out` without simulating again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomllib
from benchinfo import machine_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paper_costs import (  # noqa: E402
    MB,
    Profiler,
    flops_ratios,
    het_groups,
    low_rank,
    per_client_ranks,
    section_of,
)

from edgetune.strategies import NAMES, STRATEGIES  # noqa: E402 (torch-free registry)

RESULTS = ROOT / "bench" / "results"
#: The table's reference rows: FedAdapter against FedAvg of LoRA factors.
OURS, REFERENCE = "fedadapter", "fedavg-lora"
#: Accuracy-only rows every federated result stands beside (issue 13).
REFERENCE_ROWS = [n for n in NAMES if STRATEGIES[n].reference]

# The default: two families in two tiers, 4 clients, 4 rounds (rounds 1 and 4 gather class
# statistics for the heads, the same for every strategy: two rounds train). FedAdapter at rank
# 8 (its family bundle is 2*d*r + O(r^2) per block, LoRA r=8 on query/value is 2*2*d*8 per
# block: rank 8 keeps the comparison at equal width per factor rather than equal bytes).
DEFAULT_TOML = """
rounds = 4
strategy = "fedadapter"
seed = 0

[data]
dataset = "fortunes"
categories = ["computers", "politics", "science", "startrek", "food", "law"]
max_per_class = 120
alpha = 0.5
eval_samples = 240

[adapter]
rank = 8
n_anchors = 2

[lora]
rank = 8
alpha = 16.0
targets = ["query", "value"]

[train]
epochs = 2
batch_size = 16
lr = 0.005
max_length = 48

[server]
round_timeout_s = 600.0

[[group]]
backbone = "minilm-l3"
quant = "int8"
count = 2

[[group]]
backbone = "minilm-l6"
quant = "none"
count = 2
"""


def write_configs(base: dict[str, Any], out: Path, strategies: list[str]) -> dict[str, Path]:
    """The TOML file each strategy runs (and ``"base"``): the base config, or its
    heterogeneous-rank variant for strategies with per-client ranks."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"base": out / "config.toml"}
    paths["base"].write_text(_to_toml(base))
    for strategy in strategies:
        if not per_client_ranks(strategy):
            paths[strategy] = paths["base"]
            continue
        low = low_rank(base, strategy)
        paths[strategy] = out / f"config_het_{section_of(strategy)}.toml"
        paths[strategy].write_text(_to_toml({**base, "group": het_groups(base["group"], low)}))
    return paths


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _to_toml(config: dict[str, Any]) -> str:
    lines = [
        f"{k} = {_toml_value(v)}" for k, v in config.items() if not isinstance(v, (dict, list))
    ]
    for key, value in config.items():
        if isinstance(value, dict):
            lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in value.items()]
    for group in config.get("group", []):
        lines += ["", "[[group]]"] + [f"{k} = {_toml_value(v)}" for k, v in group.items()]
    return "\n".join(lines) + "\n"


def run_simulate(name: str, config: Path, out: Path, sets: list[str], timeout_s: float) -> Path:
    """One `edgetune simulate` run in a subprocess; returns its output folder."""
    folder = out / "runs" / name
    cmd = [sys.executable, "-m", "edgetune.cli", "simulate", "--config", str(config)]
    cmd += ["--out", str(folder)] + [a for s in sets for a in ("--set", s)]
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (out / "runs" / f"{name}.log").open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
    if proc.returncode != 0 or not (folder / "summary.json").is_file():
        raise RuntimeError(f"simulate {name} failed (exit {proc.returncode}); see {log.name}")
    print(f"{name}: {time.perf_counter() - started:.0f}s", flush=True)
    return folder


def load_rows(folder: Path) -> list[dict[str, Any]]:
    text = (folder / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def cost_to_target(rows: list[dict[str, Any]], target: float) -> tuple[int | None, float | None]:
    """(round, cumulative MB up + down) of the first round whose overall accuracy reaches
    `target`; (None, None) if none does."""
    for row in rows:
        acc = row.get("global_acc_overall")
        if acc is not None and acc >= target:
            return row["round"], row["cum_bytes"] / MB
    return None, None


def run_summary(folder: Path) -> dict[str, Any]:
    summary = json.loads((folder / "summary.json").read_text())
    rows = load_rows(folder)
    local = not STRATEGIES[summary["strategy"]].federated
    acc = summary["final_personal_test_acc"] if local else summary["final_global_acc"]
    return {
        "accuracy_kind": "personal_test" if local else "global_test",
        "final_acc": acc,
        "final_acc_overall": sum(acc.values()) / len(acc) if acc else None,
        "best_acc_overall": max(
            (r["global_acc_overall"] for r in rows if r["global_acc_overall"] is not None),
            default=None,
        ),
        "mb_up_per_client_round": summary["mb_up_per_client_round"],
        "mb_up_per_client_training_round": summary.get("mb_up_per_client_training_round"),
        "mb_total": summary["mb_up_total"] + summary["mb_down_total"],
        "wall_time_s": summary["wall_time_s"],
        "rows": rows,
    }


def reference_summary(folder: Path) -> dict[str, Any]:
    """A reference row's accuracy (probe, centralized, ...): it federates nothing of its own, so
    it has no bytes, rounds or costs in this table."""
    acc = json.loads((folder / "summary.json").read_text())["final_global_acc"]
    return {
        "accuracy_kind": "reference",
        "final_acc": acc,
        "final_acc_overall": sum(acc.values()) / len(acc) if acc else None,
        "best_acc_overall": None,
        "mb_up_per_client_round": None,
        "mb_up_per_client_training_round": None,
        "rows": [],
    }


# -- communication variants of FedAdapter --------------------------------------------------------
COMM_VARIANTS = {
    "fedadapter+int8ef": {"comm.compression": "int8"},
    "fedadapter+P2": {"comm.family_every": 2},
    "fedadapter+P2+int8ef": {"comm.compression": "int8", "comm.family_every": 2},
}
#: FedAdapter settings: rank 16 (the demo's; its family bundle is ~2x LoRA r=8 on query/value)
#: and adapters on blocks 1.. only (DESIGN.md section 9: backward stops above block 1; on the
#: wire as AdapterSpec.first_block).
SETTING_VARIANTS = {
    "fedadapter-r16": {"adapter.rank": 16},
    "fedadapter-from1": {"adapter.blocks": "from:1"},
}


# -- the table -----------------------------------------------------------------------------------
def target_accuracy(runs: dict[str, dict[str, Any]], given: float | None) -> float:
    """`given`, or the lowest best-overall accuracy among the federated strategies (FedAdapter's
    default setting and the four LoRA baselines; variants excluded): every one of them reaches it.
    """
    if given is not None:
        return given
    federated = [n for n in NAMES if STRATEGIES[n].federated]
    best = [runs[n]["best_acc_overall"] for n in federated if n in runs]
    if not best:
        raise RuntimeError("no federated run produced a global accuracy")
    return min(best)


def rivals() -> list[str]:
    """The federated strategies FedAdapter's cost-to-target is compared with."""
    return [n for n in NAMES if n != OURS and STRATEGIES[n].federated]


def upload(row: dict[str, Any]) -> float | None:
    """MB up per client per training round: what the strategy's own updates cost (statistics
    rounds, the same for every strategy, left out; runs from before they existed: all rounds)."""
    up = row.get("mb_up_per_client_training_round")
    return up if up is not None else row.get("mb_up_per_client_round")


def check_targets(table: dict[str, dict[str, Any]], ratios: list[dict[str, Any]]) -> dict:
    fed, base = table[OURS], table[REFERENCE]
    up = upload(fed) / upload(base)
    int8 = upload(table.get("fedadapter+int8ef", {}))
    others = [v["mb_to_target"] for k, v in table.items() if k in rivals()]
    cost = fed["mb_to_target"]
    return {
        "flops_vs_full_max": max(r["fedadapter_vs_full"] for r in ratios),
        "flops_vs_full_ok(<=0.62)": all(r["fedadapter_vs_full"] <= 0.62 for r in ratios),
        "flops_from1_vs_full_max": max(r["from1_vs_full"] for r in ratios),
        "flops_vs_lora_max": max(r["fedadapter_vs_lora"] for r in ratios),
        "flops_vs_lora_ok(<=1.10)": all(r["fedadapter_vs_lora"] <= 1.10 for r in ratios),
        "upload_vs_fedavg_lora": up,
        "upload_ok(<=0.58, acc >=)": up <= 0.58
        and (fed["final_acc_overall"] or 0) >= (base["final_acc_overall"] or 0),
        "upload_int8ef_vs_fedavg_lora": int8 / upload(base) if int8 else None,
        "upload_int8ef_ok(<=0.15)": bool(int8) and int8 / upload(base) <= 0.15,
        "cost_to_target_ok": cost is not None and all(o is None or cost < o for o in others),
    }


def _fmt(value: Any, digits: int = 2, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if pct else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    table, families = result["table"], result["families"]
    head = ["strategy", *[f"acc {f}" for f in families], "acc overall", "MB up/client/round",
            "MB up/client/training round", "x FedAvg-LoRA", "rounds to target", "MB to target",
            "train GFLOPs/step", "train mem MB"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = upload(table[REFERENCE])
    for name, row in table.items():
        accs = [_fmt(row["final_acc"].get(f), pct=True) for f in families]
        up = upload(row)
        cells = [name, *accs, _fmt(row["final_acc_overall"], pct=True),
                 _fmt(row["mb_up_per_client_round"], 3), _fmt(up, 3),
                 _fmt(up / base if up is not None else None, 3),
                 _fmt(row["rounds_to_target"], 0), _fmt(row["mb_to_target"], 2),
                 _fmt(row.get("train_gflops_per_step"), 3), _fmt(row.get("train_memory_mb"), 1)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Target accuracy (overall): {100 * result['target_accuracy']:.1f}%", ""]
    lines += ["| backbone | FedAdapter GFLOPs (all / from:1) | LoRA GFLOPs | full FT GFLOPs "
              "| vs full (all / from:1) | vs LoRA (all / from:1) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["flops_ratios"]:
        lines.append(f"| {r['backbone']} | {r['fedadapter_gflops']:.3f} / {r['from1_gflops']:.3f} "
                     f"| {r['lora_gflops']:.3f} | {r['full_gflops']:.3f} "
                     f"| {r['fedadapter_vs_full']:.3f} / {r['from1_vs_full']:.3f} "
                     f"| {r['fedadapter_vs_lora']:.3f} / {r['from1_vs_lora']:.3f} |")  # fmt: skip
    lines += ["", "Targets: " + json.dumps(result["targets"], indent=1), ""]
    lines += [f"Machine: {json.dumps(result['machine'])}", f"Command: `{result['command']}`", ""]
    lines += [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    return machine_info(["edgetune", "server", "bench"], dirty_key="tree_dirty", untracked=False)


def run_all(config: dict[str, Any], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every strategy's simulation (reused from `args.out` with --reuse), then the variants."""
    paths = write_configs(config, args.out, args.strategies)
    runs: dict[str, dict[str, Any]] = {}
    plans = [(s, paths[s], [f"strategy={s}"]) for s in args.strategies]
    for name, sets in {**SETTING_VARIANTS, **COMM_VARIANTS}.items():
        overrides = [f"{k}={_toml_value(v)}" for k, v in sets.items()]
        plans.append((name, paths["base"], [f"strategy={OURS}", *overrides]))
    plans += [(r, paths["base"], [f"strategy={r}"]) for r in args.references]
    for name, path, sets in plans:
        folder = args.out / "runs" / name
        if not (args.reuse and (folder / "summary.json").is_file()):
            folder = run_simulate(name, path, args.out, sets, args.timeout)
        read = reference_summary if name in REFERENCE_ROWS else run_summary
        runs[name] = read(folder)
    return runs


def costs_of(profiler: Profiler, name: str) -> dict[str, float]:
    """FLOPs and memory of a run's clients; variants cost what their base setting costs."""
    base = name.split("+")[0]
    if base not in SETTING_VARIANTS:
        return profiler.strategy_costs(base)
    sets = SETTING_VARIANTS[base]
    extra = {"blocks": sets["adapter.blocks"]} if "adapter.blocks" in sets else {}
    return profiler.strategy_costs(OURS, rank=sets.get("adapter.rank"), **extra)


def build_result(config: dict[str, Any], runs: dict[str, dict[str, Any]], args) -> dict[str, Any]:
    profiler = Profiler(config)
    target = target_accuracy(runs, args.target)
    table: dict[str, dict[str, Any]] = {}
    for name, run in runs.items():
        row = {k: v for k, v in run.items() if k != "rows"}
        row["rounds_to_target"], row["mb_to_target"] = cost_to_target(run["rows"], target)
        if run["accuracy_kind"] != "reference":
            row |= costs_of(profiler, name)
        table[name] = row
    ratios = flops_ratios(config, profiler)
    families = sorted({f for row in table.values() for f in row["final_acc"]})
    return {
        "config": config,
        "families": families,
        "target_accuracy": target,
        "table": table,
        "flops_ratios": ratios,
        "targets": check_targets(table, ratios),
        "curves": {n: r["rows"] for n, r in runs.items()},
        "machine": machine(),
        "command": " ".join(["python", "bench/paper_table.py", *sys.argv[1:]]),
        "notes": [*NOTES, *args.note],
    }


NOTES = [
    "Accuracy: global-model test accuracy per family after the last round (local: personal test "
    "accuracy of each client's own model, there is no global model).",
    "MB up/client/round: safetensors bodies as sent (metadata included) / clients / rounds; "
    "training round: the rounds that gather class statistics (train.head = 'stats': round 1 and "
    "the last, the same bundle for every strategy) left out. 'x FedAvg-LoRA' compares those.",
    "Rounds / MB to target: the first round whose overall accuracy reaches the target, and the "
    "cumulative MB up + down until then ('-': never reached).",
    "Reference rows (" + ", ".join(REFERENCE_ROWS) + "): the same config, seed, split and "
    "evaluation subset (`edgetune.sim.references`): a frozen-feature probe, one client holding all "
    "training data, every client on the family's fp32 backbone, each family federating alone.",
    "train GFLOPs/step: FlopCounterMode, one forward + backward at batch_size x max_length of "
    "the config on fp32 weights, mean over clients; train mem: weights (as quantized) + "
    "autograd-saved activations + grads + AdamW state.",
    "Per-client ranks (federated strategies whose rank_scope is 'client': "
    + ", ".join(n for n in NAMES if per_client_ranks(n))
    + "): every other client of a tier at half the section's rank, e.g. lora.rank // 2 (same "
    "client order and data shards as the other runs).",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, help="TOML config (default: the small one above)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "paper_table")
    p.add_argument("--results", type=Path, default=RESULTS, help="where JSON + Markdown go")
    runnable = [n for n in NAMES if not STRATEGIES[n].reference]
    p.add_argument("--strategies", nargs="+", default=runnable, choices=runnable)
    p.add_argument("--references", nargs="*", default=REFERENCE_ROWS, choices=REFERENCE_ROWS)
    p.add_argument("--target", type=float, help="target overall accuracy (default: see notes)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per simulate run")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs under --out")
    p.add_argument("--note", action="append", default=[], help="a note to record with the table")
    args = p.parse_args(argv)
    if REFERENCE not in args.strategies or OURS not in args.strategies:
        p.error(f"--strategies must include {OURS} and {REFERENCE} (the table's reference)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    text = args.config.read_text() if args.config else DEFAULT_TOML
    config = tomllib.loads(text)
    runs = run_all(config, args)
    result = build_result(config, runs, args)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "paper_table.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.results / "paper_table.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
