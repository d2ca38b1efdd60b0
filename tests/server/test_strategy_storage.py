"""Strategies skip bad replies without crashing; storage writes atomically and transactionally."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgetune.errors import ConfigError
from edgetune.protocol import initial_tensors
from edgetune.server.storage import BlobStore, Storage
from edgetune.strategies import NAMES, STRATEGIES, make_strategy
from edgetune.strategies.aggregation import ClientUpdate
from edgetune.strategies.base import GLOBAL, family_model

from .conftest import random_update, server_run, small_spec


def _state(spec):  # type: ignore[no-untyped-def]
    g, f = initial_tensors(spec, 0)
    return {GLOBAL: g, family_model(spec.family): f}


def test_fedadapter_strategy_skips_bad_replies() -> None:
    spec = small_spec()
    strat = make_strategy(server_run(strategy="fedadapter", beta=1.0, eta=1.0))
    good = ClientUpdate("c1", spec.family, 4, random_update(spec, 1))
    nan = random_update(spec, 2)
    nan["family.layer0.D"][0, 0] = float("nan")
    missing = random_update(spec, 3)
    missing.pop("global.anchor1.C")
    bad = [ClientUpdate("c2", spec.family, 4, nan), ClientUpdate("c3", spec.family, 4, missing)]
    specs = {"c1": spec, "c2": spec, "c3": spec}
    res = strat.aggregate_round(1, _state(spec), [good, *bad], specs)
    assert [s[0] for s in res.skipped] == ["c2", "c3"]
    assert res.summary["aggregated"] == 1
    torch.testing.assert_close(
        res.models[GLOBAL]["global.anchor1.C"], good.tensors["global.anchor1.C"]
    )
    none = strat.aggregate_round(1, _state(spec), bad, specs)
    assert none.models == {} and none.summary["aggregated"] == 0


def test_strategy_configure_round_and_spec_checks() -> None:
    spec = small_spec()
    fa = make_strategy(server_run(strategy="fedadapter"))
    assert fa.configure_round(1)["fetch"] == ["global", "family"]
    assert fa.check_spec(spec, None) is None
    assert "rank" in (fa.check_spec(small_spec(rank=2), spec) or "")
    assert "kind" in (make_strategy(server_run(strategy="hetlora")).check_spec(spec, None) or "")
    with pytest.raises(ConfigError, match="strategy='scaffold': allowed values are"):
        server_run(strategy="scaffold")


def test_the_registry_is_the_only_list_of_names() -> None:
    """Each server-side strategy answers to its registry name; local has no server side."""
    assert NAMES[:6] == ("fedadapter", "fedavg-lora", "hetlora", "flexlora", "flora", "local")
    for name, entry in STRATEGIES.items():
        if entry.federated:
            assert entry.server_class().name == name
            assert entry.server_class().kind == entry.adapter
    with pytest.raises(ConfigError, match="runs without a server"):
        make_strategy(server_run(strategy="local"))


def test_blob_store_atomic_and_idempotent(tmp_path: Path) -> None:
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "deadbeef.1.2.tmp").write_bytes(b"half")  # left by a crash
    store = BlobStore(tmp_path / "blobs")
    assert not list((tmp_path / "blobs").glob("*.tmp"))
    d1 = store.put(b"hello")
    assert store.put(b"hello") == d1 and store.get(d1) == b"hello"
    assert len(list((tmp_path / "blobs").iterdir())) == 1


def test_transaction_rolls_back(tmp_path: Path) -> None:
    st = Storage(tmp_path / "s")
    with pytest.raises(RuntimeError), st.transaction() as c:
        st.bump_counter(c, "x", 1)
        raise RuntimeError("boom")
    assert st.counter("x") == 0
    st.add_counter("x", 3)
    st.close()
    again = Storage(tmp_path / "s")
    assert again.counter("x") == 3
    again.close()


def test_restart_removes_only_unreferenced_blobs(tmp_path: Path) -> None:
    from edgetune.server.rounds import Coordinator

    from .conftest import JOIN_TOKEN, server_run

    st = Storage(tmp_path / "s")
    coord = Coordinator(server_run(), st, JOIN_TOKEN)
    coord.register(JOIN_TOKEN, small_spec().to_dict(), "fp32")
    kept = sorted(p.name for p in st.blobs.root.iterdir())
    orphan = st.blobs.put(b"written, then the server died before the commit")
    st.close()
    st = Storage(tmp_path / "s")
    Coordinator(server_run(), st, JOIN_TOKEN)
    assert sorted(p.name for p in st.blobs.root.iterdir()) == kept
    assert not st.blobs.path(orphan).exists()
    st.close()


def test_round_interrupted_while_aggregating_is_aggregated_on_restart(tmp_path: Path) -> None:
    from edgetune.protocol import encode_update
    from edgetune.server.rounds import Coordinator

    from .conftest import JOIN_TOKEN, server_run

    cfg = server_run(min_clients=2)
    st = Storage(tmp_path / "s")
    coord = Coordinator(cfg, st, JOIN_TOKEN)
    spec = small_spec()
    for seed in (1, 2):
        reg = coord.register(JOIN_TOKEN, spec.to_dict(), "fp32")
        client = coord.authenticate(reg["token"])
        assert (
            coord.submit_update(client, 1, encode_update(random_update(spec, seed), spec, 1, 3))[0]
            == 201
        )
    with st.transaction() as c:  # what a crash right after the 'aggregating' commit leaves behind
        st.mark_round_state(c, 1, "aggregating")
    st.close()
    st = Storage(tmp_path / "s")
    coord = Coordinator(cfg, st, JOIN_TOKEN)
    assert coord.current_round().state == "aggregating"
    coord.step()
    assert [r.state for r in st.rounds()] == ["closed", "open"]
    assert st.latest_model("global")[0] == 1
    st.close()
