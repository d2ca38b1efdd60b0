"""The `edgetune` CLI as a user runs it (a real subprocess)."""

import subprocess
import sys


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
    result = _run("zoo", "tiny-bert-d32-l4", "--adapter", "fedadapter", "--rank", "4")
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


def test_verbose_anywhere_version_and_positive_clients():
    assert _run("zoo", "-v").returncode == 0 and _run("-v", "zoo").returncode == 0
    version = _run("--version")
    assert version.returncode == 0 and version.stdout.startswith("edgetune ")
    zero = _run("data", "fortunes", "--clients", "0")
    assert zero.returncode == 2 and "0 is not a positive number" in zero.stderr
