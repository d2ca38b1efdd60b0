"""The `edgetune` CLI as a user runs it (a real subprocess)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgetune.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_zoo_lists_and_shows_a_spec():
    listing = _run("zoo")
    assert listing.returncode == 0 and "minilm-l3" in listing.stdout
    shown = _run("zoo", "tiny-llama-d32-l3")
    assert shown.returncode == 0 and "model.layers.0.mlp" in shown.stdout


def test_data_shows_class_counts_and_partition():
    result = _run("data", "fortunes", "--categories", "computers,food", "--clients", "3")
    assert result.returncode == 0, result.stderr
    assert "computers" in result.stdout and "label skew" in result.stdout


def test_unknown_backbone_exits_with_clear_error():
    result = _run("zoo", "no-such-model")
    assert result.returncode == 2 and "unknown backbone 'no-such-model'" in result.stderr


def test_zoo_prints_adapter_parameter_counts():
    result = _run("zoo", "tiny-bert-d32-l4", "--kind", "fedadapter", "--rank", "4")
    assert result.returncode == 0, result.stderr
    # K=2 anchors x (4*4 + 4) global parameters, exactly.
    assert any(line.split()[:2] == ["global", "40"] for line in result.stdout.splitlines())


def test_zoo_prints_quantized_weight_memory():
    result = _run("zoo", "tiny-bert-d64-l2", "--quant", "nf4")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.split()}
    assert rows["none"][-3] == "1.000" and float(rows["nf4"][-1]) < 0.2  # linears shrink ~8x


def test_server_names_a_missing_join_token_file(tmp_path):
    missing = tmp_path / "nope"
    proc = _run("server", "--state", str(tmp_path / "s"), "--set", "server.min_clients=2",
                "--join-token-file", str(missing))  # fmt: skip
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.count("\n") == 0 and "Traceback" not in err
    assert f"join token file {missing} does not exist" in err


def test_a_server_url_without_a_scheme_is_one_line_not_a_retry_loop():
    """Issue 17: `--server 127.0.0.1:PORT` was retried for 44 s and then reported as a 503."""
    proc = _run("client", "--server", "127.0.0.1:8080", "--join-token", "t")
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.count("\n") == 0 and "Traceback" not in err
    assert "client.url='127.0.0.1:8080'" in err and "http://" in err


def test_verbose_anywhere_version_and_positive_clients():
    assert _run("zoo", "-v").returncode == 0 and _run("-v", "zoo").returncode == 0
    version = _run("--version")
    assert version.returncode == 0 and version.stdout.startswith("edgetune ")
    zero = _run("data", "fortunes", "--clients", "0")
    assert zero.returncode == 2 and "0 is not a positive number" in zero.stderr


# -- simulate --resume and failed starts (issue 17) --------------------------------------------
TINY = Path(__file__).parents[1] / "data" / "tiny_sim.toml"


SMALL = """rounds = 3
[data]
categories = ["computers", "food"]
max_per_class = 12
[adapter]
rank = 4
n_anchors = 1
[train]
batch_size = 8
max_length = 16
[[group]]
backbone = "tiny-bert-d32-l2"
count = 2
"""


def _simulate(out: Path, *extra: str) -> list[str]:
    config = out.parent / "small.toml"
    config.write_text(SMALL)
    return [sys.executable, "-m", "edgetune", "simulate", "--config",
            str(config), "--out", str(out), *extra]  # fmt: skip


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_round_one(proc: subprocess.Popen, out: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        cards = list(out.glob("server/final/*/model.json"))
        if cards and all(json.loads(c.read_text())["version"] >= 1 for c in cards):
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"round 1 did not close (exit {proc.poll()})")


@pytest.mark.slow
def test_resume_continues_a_stopped_run_and_refuses_another_config(tmp_path):
    out = tmp_path / "run"
    # SIGINT at its default in the run: a suite started in the background (`make test &`,
    # nohup) ignores it, and a child would inherit that and run to the end (exit 0)
    proc = subprocess.Popen(_simulate(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=_default_sigint)  # fmt: skip
    _wait_for_round_one(proc, out)
    # Stopped after round 1 (or 2: a tiny round can close before the signal lands) of 3.
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=240)  # shutting down server and clients takes long on a loaded machine
    assert proc.returncode != 0 and (out / "config.json").is_file()
    other = subprocess.run(_simulate(out, "--resume", "--set", "train.epochs=2"),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert other.stderr.strip().count("\n") == 0
    assert "config differs" in other.stderr and "train.epochs (1 there, 2 here)" in other.stderr
    again = subprocess.run(_simulate(out, "--resume"), capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    card = json.loads((out / "final" / "tiny-bert-d32-l2" / "model.json").read_text())
    assert card["version"] == 3


def test_resume_needs_a_run_and_a_run_failing_at_start_leaves_nothing(tmp_path, capsys):
    from edgetune.cli import main

    out = tmp_path / "run"
    assert main(["simulate", "--config", str(TINY), "--out", str(out), "--resume"]) == 2
    assert "--resume: " in capsys.readouterr().err and not out.exists()
    bad_data = ["--set", f"data.dataset={tmp_path / 'missing.csv'}"]
    assert main(["simulate", "--config", str(TINY), "--out", str(out), *bad_data]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.csv" in err and "Traceback" not in err
    assert not out.exists()  # no config.json, no server/ left behind


# -- help text and shown defaults (issue 17) ---------------------------------------------------
def _options():
    import argparse

    from edgetune.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction):
                yield name, action, formatter._get_help_string(action) or ""


def test_every_option_of_every_subcommand_has_help_and_shows_its_default():
    seen = 0
    for command, action, text in _options():
        seen += 1
        where = f"edgetune {command} {'/'.join(action.option_strings) or action.dest}"
        assert len(text.strip()) > 3, f"{where}: no help text"
        flag = action.nargs == 0 or action.required or not action.option_strings
        assert flag or "default" in text, f"{where}: default not shown in {text!r}"
    assert seen > 60  # every subcommand was walked


def test_one_word_per_concept_across_subcommands():
    """An option name means one thing everywhere: --adapter is a file, --kind an adapter kind,
    --batch-size a batch size; old names still parse but are not shown."""
    from edgetune.cli import build_parser

    named: dict[str, set[str]] = {}
    for command, action, _ in _options():
        for option in action.option_strings:
            named.setdefault(option, set()).add(command)
    assert "--batch" not in named and "--batch-size" in named
    assert named["--kind"] == {"zoo", "profile"}
    assert named["--adapter"] == {"export", "infer"}
    old = build_parser().parse_args(
        ["profile", "--backbone", "x", "--adapter", "lora", "--batch", "4"]
    )
    assert (old.adapter, old.batch) == ("lora", 4)
    new = build_parser().parse_args(["profile", "--backbone", "x", "--kind", "lora"])
    assert (new.adapter, new.batch) == ("lora", 8)


def test_help_shows_defaults():
    result = _run("profile", "--help")
    assert result.returncode == 0 and "(default: 8)" in result.stdout
    assert "(default: none)" in _run("zoo", "--help").stdout
