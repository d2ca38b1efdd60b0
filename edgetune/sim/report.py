"""Outputs of a simulation: `metrics.jsonl` (a line per round), `summary.json`, PNG plots.

An ``lm`` run adds ``global_perplexity`` (per family) to each line, a perplexity table, and
its final models' greedy samples (``samples`` in `summary.json`).

Round r's line joins the evaluator's test accuracy of the version-r global model of each
family with what the clients logged for round r (bytes as sent, personal accuracy on their
held-out data after local training, estimated train FLOPs). Round 0 is the initial model.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from edgetune.config import RunConfig

log = logging.getLogger(__name__)
MB = 1e6


def _client_lines(out: Path) -> list[dict[str, Any]]:
    lines = []
    for path in sorted((out / "clients").glob("c*/rounds.jsonl")):
        client = path.parent.name
        text = path.read_text()
        complete = text[: text.rfind("\n") + 1]  # a client may be appending the last line
        for line in complete.splitlines():
            if line.strip():
                lines.append({"client": client, **json.loads(line)})
    return lines


class RoundTable:
    def __init__(self, out: Path, config: RunConfig) -> None:
        self.out = out
        self.config = config
        self.global_acc: dict[int, dict[str, float]] = defaultdict(dict)
        # task = "lm": held-out perplexity (exp of the mean token NLL) of each family's model
        self.global_ppl: dict[int, dict[str, float]] = defaultdict(dict)
        self.rows: list[dict[str, Any]] = []
        self.shown_round = -1  # newest round already written by `grown_lines`

    def record(self, family: str, result: dict[str, Any]) -> None:
        """The evaluator's test accuracy of one family's model version; rewrites the file."""
        self.global_acc[int(result["version"])][family] = float(result["acc"])
        if self.config.task == "lm":
            self.global_ppl[int(result["version"])][family] = perplexity(float(result["loss"]))
        self._write()

    def refresh(self) -> None:
        """Re-read the clients' round lines and rewrite `metrics.jsonl`."""
        self._write()

    def _build_rows(self) -> list[dict[str, Any]]:
        by_round: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for line in _client_lines(self.out):
            by_round[int(line["round"])].append(line)
        rounds = sorted(set(self.global_acc) | set(by_round))
        rows, cumulative = [], 0
        for r in rounds:
            lines = by_round.get(r, [])
            up, down = sum(x["bytes_up"] for x in lines), sum(x["bytes_down"] for x in lines)
            cumulative += up + down
            personal, by_tier = defaultdict(list), defaultdict(list)
            for x in lines:
                if "personal_acc" in x:
                    personal[x["family"]].append(x["personal_acc"])
                    by_tier[f"{x['family']}/{x['tier']}"].append(x["personal_acc"])
            glob = self.global_acc.get(r, {})
            rows.append(
                {
                    "round": r,
                    "statistics_round": r > 0 and self.config.statistics_round(r),
                    "global_acc": glob,
                    "global_acc_overall": mean(glob.values()) if glob else None,
                    **self._perplexity_of(r),
                    "personal_acc": {f: mean(v) for f, v in personal.items()},
                    "personal_acc_by_tier": {t: mean(v) for t, v in sorted(by_tier.items())},
                    "personal_acc_overall": mean(a for v in personal.values() for a in v)
                    if personal
                    else None,
                    "clients": len(lines),
                    "bytes_up": up,
                    "bytes_down": down,
                    "cum_bytes": cumulative,
                    "train_gflops_est": sum(x.get("train_gflops_est", 0.0) for x in lines),
                    "train_seconds_max": max(
                        (x.get("train_seconds", 0.0) for x in lines), default=0.0
                    ),
                }
            )
        return rows

    def _perplexity_of(self, version: int) -> dict[str, Any]:
        """``global_perplexity`` (per family) of an lm run's row; nothing for classification."""
        if self.config.task != "lm":
            return {}
        return {"global_perplexity": dict(self.global_ppl.get(version, {}))}

    def _write(self) -> None:
        self.rows = self._build_rows()
        text = "".join(json.dumps(row) + "\n" for row in self.rows)
        (self.out / "metrics.jsonl").write_text(text)

    def print_table(self) -> str:
        families = self._families()
        lines = [*self._header(families), *(self._line(row, families) for row in self.rows)]
        table = "\n".join(lines)
        print(table, flush=True)
        return table

    def grown_lines(self, closed_round: int) -> list[str]:
        """The table as it grows: its header once, then each evaluated round up to
        ``closed_round`` not shown yet (the simulate progress bar writes them above itself)."""
        families = self._families()
        lines = [] if self.shown_round >= 0 else self._header(families)
        for row in self.rows:
            if self.shown_round < row["round"] <= closed_round and row["global_acc"]:
                lines.append(self._line(row, families))
                self.shown_round = row["round"]
        return lines if self.shown_round >= 0 else []

    def _families(self) -> list[str]:
        return sorted(
            {f for row in self.rows for f in row["global_acc"]}
            | {f for row in self.rows for f in row["personal_acc"]}
        )

    def _header(self, families: list[str]) -> list[str]:
        columns = " ".join(f"{f[:14]:>14}" for f in families)
        ppl = "".join(f" {'ppl ' + f[:10]:>14}" for f in families) if self._lm else ""
        return [
            "global-model test accuracy per family (personal = clients' held-out, after training)",
            f"{'round':>5} {columns} {'overall':>8} {'personal':>8} {'MB up':>8} "
            f"{'MB down':>8} {'GFLOP':>8}{ppl}",
        ]

    def _line(self, row: dict[str, Any], families: list[str]) -> str:
        accs = " ".join(f"{_pct(row['global_acc'].get(f)):>14}" for f in families)
        ppl = row.get("global_perplexity", {})
        ppls = "".join(f" {_num(ppl.get(f))}" for f in families) if self._lm else ""
        return (
            f"{row['round']:>5} {accs} {_pct(row['global_acc_overall']):>8} "
            f"{_pct(row['personal_acc_overall']):>8} {row['bytes_up'] / MB:>8.2f} "
            f"{row['bytes_down'] / MB:>8.2f} {row['train_gflops_est']:>8.1f}{ppls}"
        )

    @property
    def _lm(self) -> bool:
        """An lm run's table also shows each family's held-out perplexity."""
        return self.config.task == "lm"

    def finish(self, wall_s: float, client_results: list[dict[str, Any]]) -> dict[str, Any]:
        self._write()
        table = self.print_table()
        if self.config.task == "lm":
            table += "\n" + self.print_perplexity()
        summary = self._summary(wall_s, client_results)
        if self.config.task == "lm":
            summary.update(self._lm_summary())
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        (self.out / "table.txt").write_text(table + "\n")
        return summary

    def _summary(self, wall_s: float, client_results: list[dict[str, Any]]) -> dict[str, Any]:
        first = next((r for r in self.rows if r["round"] == 0), None)
        last = max(
            (r for r in self.rows if r["global_acc"]), key=lambda r: r["round"], default=None
        )
        personal_test = defaultdict(list)
        for line, result in zip(self._families_of_clients(), client_results):
            if "personal_test_acc" in result:
                personal_test[line].append(result["personal_test_acc"])
        n_clients = max(1, self.config.num_clients)
        total_up = sum(r["bytes_up"] for r in self.rows)
        if not self.config.strategy_def.federated:  # no server model, only personal ones
            last = None
        return {
            "strategy": self.config.strategy,
            "rounds": self.config.rounds,
            "wall_time_s": round(wall_s, 1),
            "initial_global_acc": first["global_acc"] if first else {},
            "final_round": last["round"] if last else None,
            "final_global_acc": last["global_acc"] if last else {},
            "final_personal_test_acc": {f: mean(v) for f, v in personal_test.items()},
            "mb_up_total": total_up / MB,
            "mb_down_total": sum(r["bytes_down"] for r in self.rows) / MB,
            "mb_up_per_client_round": total_up / MB / n_clients / max(1, self.config.rounds),
            # the adapter updates alone: rounds that gather class statistics left out
            "mb_up_per_client_training_round": self._training_upload_mb() / n_clients,
            "train_gflops_est_total": sum(r["train_gflops_est"] for r in self.rows),
            "clients": client_results,
        }

    def _training_upload_mb(self) -> float:
        """MB uploaded per training round (statistics rounds left out), 0 if none trained."""
        rounds = self.config.training_rounds()
        up = sum(r["bytes_up"] for r in self.rows if r["round"] in rounds)
        return up / MB / max(1, len(rounds))

    def print_perplexity(self) -> str:
        """The lm run's table: held-out perplexity of each family's global model per round."""
        rows = [r for r in self.rows if r.get("global_perplexity")]
        families = sorted({f for r in rows for f in r["global_perplexity"]})
        lines = [
            "global-model held-out perplexity per family (lower is better)",
            f"{'round':>5} " + " ".join(f"{f[:14]:>14}" for f in families),
        ]
        for row in rows:
            cells = (row["global_perplexity"].get(f) for f in families)
            lines.append(f"{row['round']:>5} " + " ".join(_num(c) for c in cells))
        table = "\n".join(lines)
        print(table, flush=True)
        return table

    def _lm_summary(self) -> dict[str, Any]:
        """First and last perplexity per family, and the final models' greedy samples."""
        rows = [r for r in self.rows if r.get("global_perplexity")]
        samples = {}
        for path in sorted((self.out / "final").glob("*/samples.json")):
            samples[path.parent.name] = json.loads(path.read_text())
        return {
            "initial_global_perplexity": rows[0]["global_perplexity"] if rows else {},
            "final_global_perplexity": rows[-1]["global_perplexity"] if rows else {},
            "samples": samples,
        }

    def _families_of_clients(self) -> list[str]:
        families: dict[str, str] = {}
        for line in _client_lines(self.out):
            families[line["client"]] = line["family"]
        return [families.get(f"c{i}", "?") for i in range(self.config.num_clients)]


def perplexity(mean_nll: float) -> float:
    """exp of a mean token NLL (capped so a diverged model reports inf-like, not an error)."""
    return math.exp(min(mean_nll, 700.0))


def _num(value: float | None) -> str:
    return f"{'-':>14}" if value is None else f"{value:>14.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def write_plots(out: Path, title: str = "") -> list[Path]:
    """Accuracy vs round and vs cumulative MB as PNG files in ``out``: each family's global
    model (solid) beside its clients' personal accuracy (dashed), titled with ``title``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    paths = []
    for name, xkey in (("accuracy_vs_round.png", "round"), ("accuracy_vs_mb.png", "cum_bytes")):
        fig = accuracy_figure(rows, xkey, title)
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)
    return paths


def plot_title(strategy: str, config_name: str, out: Path, engine: str = "") -> str:
    """ "fedadapter on Flower · demo → runs/demo": what ran, from which config, into where."""
    on = f" on {engine}" if engine else ""
    return f"{strategy}{on} · {config_name or 'config'} → {out.name}"


def accuracy_figure(rows: list[dict[str, Any]], xkey: str, title: str) -> Any:
    """One matplotlib figure of ``rows`` (metrics.jsonl) against ``xkey`` ("round", integer
    ticks, or "cum_bytes", in MB)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = _plot_curves(ax, rows, xkey)
    if xkey == "round":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round" if xkey == "round" else "cumulative MB (up + down)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _plot_curves(ax: Any, rows: list[dict[str, Any]], xkey: str) -> int:
    """One solid line per family's global model, one dashed per family's personal accuracy
    (a single point, as in a local-only run, is drawn as a marker); returns lines drawn."""
    scale = MB if xkey == "cum_bytes" else 1
    keys = {"global_acc": ("-", "global"), "personal_acc": ("--", "personal")}
    families = sorted({f for row in rows for key in keys for f in row.get(key, {})})
    drawn = 0
    for key, (style, label) in keys.items():
        for index, family in enumerate(families):  # one colour per family
            points = [(r[xkey] / scale, r[key][family]) for r in rows if family in r.get(key, {})]
            if points:
                ax.plot(*zip(*points), linestyle=style, marker="o", color=f"C{index}",
                        label=f"{family} {label}")  # fmt: skip
                drawn += 1
    return drawn
