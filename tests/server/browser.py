"""Debian's ``chromium`` for the status-page test: found on PATH, else installed with apt.

The test is skipped (with the reason) only where apt cannot run: no ``apt-get``, or neither
root nor passwordless sudo. Where apt can run and the install fails, the test fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

NAMES = ("chromium", "chromium-browser")
APT_TIMEOUT_S = 900


def _apt_prefix() -> list[str] | None:
    """How to run apt-get as root here, or None when it cannot run."""
    if shutil.which("apt-get") is None:
        return None
    if os.geteuid() == 0:
        return []
    if (
        shutil.which("sudo")
        and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0
    ):
        return ["sudo", "-n"]
    return None


def find_or_install_chromium() -> str:
    """The chromium executable; installs Debian's package when it is missing."""
    for name in NAMES:
        if path := shutil.which(name):
            return path
    prefix = _apt_prefix()
    if prefix is None:
        pytest.skip("chromium is not installed and apt-get cannot run here (no apt, no root/sudo)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    for args in (["update"], ["install", "-y", "--no-install-recommends", "chromium"]):
        cmd = [*prefix, "apt-get", *lock, *args]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=APT_TIMEOUT_S)
        if done.returncode:
            pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-800:]}")
    for name in NAMES:
        if path := shutil.which(name):
            return path
    pytest.fail("apt-get installed chromium but no chromium executable is on PATH")


def headless(chromium: str, profile: Path, *args: str, timeout: float = 90) -> str:
    """Run headless chromium with ``args``; its stdout. The virtual time budget lets the page's
    fetch of /v1/status and its rendering finish before the DOM is dumped or the shot taken."""
    cmd = [
        "nice", "-n", "15", chromium, "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
        f"--user-data-dir={profile}", "--virtual-time-budget=8000", *args,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
