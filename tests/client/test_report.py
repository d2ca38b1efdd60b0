"""What simulate shows (issue 17): titled plots with integer round ticks and personal accuracy
beside global, and the per-round table growing above the progress bar."""

import dataclasses
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from edgetune.config import RunConfig
from edgetune.sim.report import RoundTable, accuracy_figure, plot_title

ROWS = [  # two families, personal accuracy reported from round 1 on (as metrics.jsonl)
    {"round": 0, "cum_bytes": 0, "global_acc": {"a": 0.25, "b": 0.3}},
    {"round": 1, "cum_bytes": 2e6, "global_acc": {"a": 0.5, "b": 0.4}, "personal_acc": {"a": 0.6}},
    {"round": 2, "cum_bytes": 4e6, "global_acc": {"a": 0.7, "b": 0.5}, "personal_acc": {"a": 0.8}},
]


def test_round_plot_has_a_title_integer_ticks_and_personal_lines():
    title = plot_title("fedadapter", "demo", Path("runs/demo"))
    assert title == "fedadapter · demo → demo"
    fig = accuracy_figure(ROWS, "round", title)
    ax = fig.axes[0]
    assert ax.get_title() == title
    assert all(float(t).is_integer() for t in ax.get_xticks())  # no 0.5-round ticks
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"a global", "b global", "a personal"}
    assert lines["a personal"].get_linestyle() == "--" and lines["a global"].get_linestyle() == "-"
    assert list(lines["a personal"].get_ydata()) == [0.6, 0.8]
    plt.close(fig)


def test_mb_plot_is_in_megabytes_and_a_single_point_is_still_drawn():
    fig = accuracy_figure(ROWS[:1], "cum_bytes", plot_title("local", "", Path("o"), "Flower"))
    ax = fig.axes[0]
    assert ax.get_title() == "local on Flower · config → o"
    (only_a, only_b) = ax.get_lines()
    assert only_a.get_marker() == "o" and list(only_b.get_xdata()) == [0.0]
    assert ax.get_xlabel() == "cumulative MB (up + down)"
    fig2 = accuracy_figure(ROWS, "cum_bytes", "")
    assert list(fig2.axes[0].get_lines()[0].get_xdata()) == [0.0, 2.0, 4.0]
    plt.close("all")


def test_the_round_table_grows_one_evaluated_round_at_a_time(tmp_path):
    table = RoundTable(tmp_path, RunConfig())
    (tmp_path / "clients" / "c0").mkdir(parents=True)
    assert table.grown_lines(0) == []  # nothing evaluated yet: no header either
    table.record("fam", {"version": 0, "acc": 0.25})
    header_and_round0 = table.grown_lines(0)
    assert len(header_and_round0) == 3 and header_and_round0[2].split()[:2] == ["0", "25.0"]
    line = {"round": 1, "family": "fam", "tier": "fp32", "bytes_up": 2_000_000, "bytes_down": 0}
    (tmp_path / "clients" / "c0" / "rounds.jsonl").write_text(json.dumps(line) + "\n")
    table.record("fam", {"version": 1, "acc": 0.5})
    assert table.grown_lines(0) == []  # round 1 has not closed on the server yet
    (round1,) = table.grown_lines(1)
    assert round1.split()[:2] == ["1", "50.0"] and "2.00" in round1.split()
    assert table.grown_lines(1) == []  # each round once


def test_an_lm_runs_growing_table_shows_perplexity_per_family(tmp_path):
    table = RoundTable(tmp_path, dataclasses.replace(RunConfig(), task="lm"))
    table.record("smol", {"version": 0, "acc": 0.3, "loss": math.log(84.2)})
    header, round0 = table.grown_lines(0)[1:]
    assert header.split()[-2:] == ["ppl", "smol"]
    assert round0.split()[-1] == "84.20"  # exp of the mean token NLL


def test_statistics_rounds_are_round_1_and_the_last_of_three_or_more():
    def rounds_of(**changes):
        config = dataclasses.replace(RunConfig(), **changes)
        return [r for r in range(1, config.rounds + 1) if config.statistics_round(r)]

    assert rounds_of(rounds=5) == [1, 5]
    assert rounds_of(rounds=2) == [1]  # round 2 trains: the head of round 1 stays
    assert rounds_of(rounds=5, task="lm") == []  # no classifier head to fit
    sgd = dataclasses.replace(RunConfig().train, head="sgd")
    assert rounds_of(rounds=5, train=sgd) == []


def test_the_summary_separates_training_rounds_bytes_from_statistics_rounds(tmp_path):
    config = dataclasses.replace(RunConfig(), rounds=3)  # round 1 and 3 gather statistics
    table = RoundTable(tmp_path, config)
    for client, ups in {"c0": (9e6, 1e6, 7e6), "c1": (9e6, 3e6, 7e6)}.items():
        (tmp_path / "clients" / client).mkdir(parents=True)
        lines = [
            {"round": r, "family": "f", "tier": "t", "bytes_up": up, "bytes_down": 0}
            for r, up in enumerate(ups, start=1)
        ]
        (tmp_path / "clients" / client / "rounds.jsonl").write_text(
            "\n".join(json.dumps(x) for x in lines) + "\n"
        )
    table.record("f", {"version": 3, "acc": 0.5})
    table.refresh()
    assert [r["statistics_round"] for r in table.rows] == [True, False, True]
    summary = table._summary(1.0, [])
    # RunConfig() declares no groups: the per-client figures divide by max(1, clients) = 1
    assert summary["mb_up_per_client_training_round"] == 4.0  # (1 + 3) MB in round 2 alone
    assert summary["mb_up_per_client_round"] == 36.0 / 3
