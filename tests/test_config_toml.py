"""TOML reading on every supported Python: tomllib (3.11+) or the tomli backport (3.10)."""

import subprocess
import sys
import textwrap

import pytest

from edgetune.config import load_config, read_toml
from edgetune.errors import ConfigError


def test_python_310_path_reads_toml_with_tomli(tmp_path):
    """Without `tomllib` (as on Python 3.10, JetPack 6) the config reads TOML through tomli."""
    path = tmp_path / "run.toml"
    path.write_text('rounds = 3\n[server]\nbeta = 0.25\n[[group]]\nbackbone = "tiny-bert"\n')
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["tomllib"] = None  # what Python 3.10 lacks
        from edgetune.config import load_config, toml
        assert toml.tomllib.__name__ == "tomli", toml.tomllib
        run = load_config({str(path)!r}, ["server.eta=0.5"])
        assert (run.rounds, run.server.beta, run.server.eta, run.quorum) == (3, 0.25, 0.5, 1)
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_json_tables_read_like_toml(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"rounds": 2, "server": {"min_clients": 3}}')
    run = load_config(path)
    assert (run.rounds, run.quorum) == (2, 3)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="object of tables"):
        read_toml(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [("rounds = \n", "not valid TOML"), ("[client]\nurl = 'ftp://x'\n", "client.url='ftp://x'")],
)
def test_bad_files_are_named(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
