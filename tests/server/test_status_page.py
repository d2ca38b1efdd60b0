"""The status page at ``/``, rendered by a real headless chromium against a live server
(issue 17, item 3): rounds, clients per family and tier, curves, the last errors."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

from .browser import find_or_install_chromium, headless
from .conftest import JOIN_TOKEN, ApiClient, random_update, small_spec, wait_for_round


@pytest.fixture(scope="module")
def chromium() -> str:
    return find_or_install_chromium()


def _rows(dom: str, table: str) -> list[list[str]]:
    body = re.search(rf'<table id="{table}">.*?<tbody>(.*?)</tbody>', dom, re.S)
    assert body, f"table {table} missing from the DOM"
    return [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", body[1])]


def _upload(client: ApiClient, round_id: int, acc: float) -> dict:
    body = client.encode(random_update(client.spec, round_id), round_id, 10, personal_acc=acc)
    answer = client.put(round_id, body)
    assert answer.status_code == 201, answer.text
    return answer.json()


def test_the_page_renders_a_live_run_in_chromium(live_server, chromium, tmp_path: Path) -> None:
    srv = live_server(rounds=3, min_clients=2)
    a = ApiClient(srv.url, small_spec("fam-a"), tier="nf4")
    b = ApiClient(srv.url, small_spec("fam-b", d_model=16), tier="fp32")
    for round_id in (1, 2):
        _upload(a, round_id, 0.4 + 0.1 * round_id)
        _upload(b, round_id, 0.3 + 0.1 * round_id)
        wait_for_round(a, round_id + 1)
    first = _upload(a, 3, 0.7)  # round 3 is live: one upload of two
    page = f"{srv.url}/#token={JOIN_TOKEN}"
    live = headless(chromium, tmp_path / "profile", "--dump-dom", page)
    assert 'data-rounds="3"' in live
    rounds = _rows(live, "rounds")
    assert [r[:3] for r in rounds] == [
        ["1", "closed", "2"],
        ["2", "closed", "2"],
        ["3", "collecting", "1"],
    ]
    assert sorted(r for r in _rows(live, "clients")) == [
        ["fam-a", "nf4", "1"],
        ["fam-b", "fp32", "1"],
    ]
    assert 'data-metric="personal_acc"' in live and "fam-a / nf4" in live
    assert 'data-metric="MB uploaded (cumulative)"' in live
    assert "Round 3: collecting, 1/2 uploads" in live

    srv.storage.blobs.path(first["sha256"]).unlink()  # a's update is lost: round 3 skips it
    _upload(b, 3, 0.6)
    while not a.round()["finished"]:
        time.sleep(0.02)
    assert a.round()["seconds_left"] == 0  # no countdown after the run finished
    done = headless(chromium, tmp_path / "profile", "--dump-dom", page)
    assert "Finished after round 3." in done
    assert f"round 3: {a.client_id} skipped: blob unreadable" in done
    shot = tmp_path / "status.png"
    headless(
        chromium, tmp_path / "profile", "--window-size=1100,1400", f"--screenshot={shot}", page
    )
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:4] == b"\x89PNG"


def test_a_wrong_token_is_told_and_no_token_is_asked_for(live_server, chromium, tmp_path: Path):
    srv = live_server()
    page = httpx.get(f"{srv.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text.replace(srv.url, "") and "https://" not in page.text
    asked = headless(chromium, tmp_path / "p", "--dump-dom", f"{srv.url}/")
    assert "Enter the server's join token" in asked and 'id="view" hidden' in asked
    wrong = headless(
        chromium, tmp_path / "p", "--dump-dom", f"{srv.url}/#token=not-a-valid-token-x"
    )
    assert re.search(r'<p id="err">401: [^<]+</p>', wrong) and 'id="view" hidden' in wrong
