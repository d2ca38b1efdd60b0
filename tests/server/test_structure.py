"""How ``server/`` is put together: SQL only in storage.py, no import cycles, the server's
imports, one header parse per upload and one decode per stored update at aggregation."""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch

from edgetune.protocol import encode_update
from edgetune.server import app as server_app
from edgetune.server import registry, rounds, validation
from edgetune.server.rounds import Coordinator, round_metric_rows
from edgetune.server.storage import ClientRecord, Storage, UpdateRecord

from .conftest import JOIN_TOKEN, random_update, server_run, small_spec

SERVER = Path(__file__).resolve().parents[2] / "server"
SQL = re.compile(
    r"\b(SELECT\s.*\bFROM\b|INSERT\s+(OR\s+\w+\s+)?INTO\b|UPDATE\s+\w+\s+SET\b|DELETE\s+FROM\b"
    r"|CREATE\s+(TABLE|INDEX|VIEW|TRIGGER)\b|PRAGMA\b)"
    r"|\.execute(many|script)?\("
)


def _server_modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(SERVER.glob("*.py"))}


def test_sql_lives_only_in_storage() -> None:
    found = []
    for path in sorted(SERVER.glob("*.py")):
        if path.name == "storage.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if SQL.search(line):
                found.append(f"server/{path.name}:{n}: {line.strip()}")
    assert not found, "SQL outside server/storage.py:\n" + "\n".join(found)
    # the pattern does recognise this code base's SQL
    storage_hits = [ln for ln in (SERVER / "storage.py").read_text().splitlines() if SQL.search(ln)]
    assert len(storage_hits) >= 20


def _local_imports(tree: ast.Module) -> set[str]:
    """Sibling modules a module imports (``from . import x``, ``from .x import y``), anywhere
    in it: module level, inside functions and under ``if TYPE_CHECKING:`` alike."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith("edgetune.server."):
                    out.add(name.split(".")[2])
    return out


def test_no_import_cycles_inside_server() -> None:
    graph = {name: _local_imports(tree) for name, tree in _server_modules().items()}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(node) :], node]))
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*path, node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])
    assert graph["status"] == {"storage"}, "status is a pure function of the storage"
    assert "status" in graph["rounds"] and "rounds" not in graph["status"]


ALLOWED_ROOMS = {"protocol", "config", "strategies", "errors"}


def test_server_imports_only_its_allowed_rooms() -> None:
    bad = []
    for name, tree in _server_modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
                if node.module == "edgetune":
                    names = [f"edgetune.{a.name}" for a in node.names]
            else:
                continue
            for full in names:
                parts = full.split(".")
                if parts[0] != "edgetune" or (len(parts) > 1 and parts[1] == "server"):
                    continue
                if len(parts) == 1 or parts[1] not in ALLOWED_ROOMS:
                    bad.append(f"server/{name}.py:{node.lineno}: {full}")
    assert not bad, "\n".join(bad)


def test_version_comes_from_the_distribution() -> None:
    assert metadata.version("edgetune") == server_app.VERSION


# -- the upload path -----------------------------------------------------------------------


def _counting(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[Any]:
    """Wrap ``module.name`` so that every call's first argument is recorded."""
    calls: list[Any] = []
    real: Callable[..., Any] = getattr(module, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0] if args else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_upload_parses_once_and_aggregation_decodes_each_blob_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str
) -> None:
    from edgetune.protocol import compress_update

    st = Storage(tmp_path / "s", synchronous="OFF", fsync_blobs=False)
    coord = Coordinator(server_run(min_clients=2), st, JOIN_TOKEN)
    spec = small_spec()
    bodies = []
    clients = []
    for seed in (1, 2):
        clients.append(coord.authenticate(coord.register(JOIN_TOKEN, spec.to_dict(), "q")["token"]))
        wire, tag = compress_update(random_update(spec, seed), None, compression)
        bodies.append(encode_update(wire, spec, 1, 3, {"loss": 1.0}, compression=tag))
    headers = _counting(monkeypatch, validation, "parse_header")
    loads = _counting(monkeypatch, validation, "load_safetensors")
    decodes = _counting(monkeypatch, rounds, "decode_payload")
    view_decodes = _counting(monkeypatch, registry, "decode_payload")
    for client, body in zip(clients, bodies):
        status, reply = coord.submit_update(client, 1, body)
        assert status == 201, reply
    assert len(headers) == 2 and len(loads) == 2  # one parse and one load per upload
    assert decodes == [] and view_decodes == []
    coord.step()
    assert [r.state for r in st.rounds()] == ["closed", "open"]
    decoded = [bytes(d) for d in decodes]
    for body in bodies:  # each stored update decoded exactly once at aggregation
        assert decoded.count(body) == 1
    st.close()


# -- storage methods -----------------------------------------------------------------------


def test_storage_round_methods(tmp_path: Path) -> None:
    st = Storage(tmp_path / "s", synchronous="OFF", fsync_blobs=False)
    with st.transaction() as c:
        assert st.latest_round(c) is None
        st.insert_round(c, 1, 10.0, 20.0)
        assert st.latest_round(c) is not None  # the transaction sees its own writes
    assert st.latest_round().state == "open"  # type: ignore[union-attr]
    with st.transaction() as c:
        st.mark_round_state(c, 1, "aggregating", only_from="collecting")  # not collecting
    assert st.rounds()[0].state == "open"
    with st.transaction() as c:
        st.mark_round_state(c, 1, "collecting", only_from="open")
        st.extend_round(c, 1, 30.0)
    rec = st.rounds()[0]
    assert (rec.state, rec.deadline, rec.extensions) == ("collecting", 30.0, 1)
    with pytest.raises(ValueError), st.transaction() as c:
        st.mark_round_state(c, 1, "finished")
    with pytest.raises(ValueError), st.transaction() as c:
        st.end_round(c, 1, "open", {})
    with st.transaction() as c:
        st.end_round(c, 1, "closed", {"updates": 0}, closed_at=40.0)
    rec = st.rounds()[0]
    assert (rec.state, rec.closed_at, rec.summary) == ("closed", 40.0, {"updates": 0})
    st.close()


def test_storage_client_update_and_metric_methods(tmp_path: Path) -> None:
    st = Storage(tmp_path / "s", synchronous="OFF", fsync_blobs=False)
    spec = small_spec()
    with st.transaction() as c:
        st.pin_family(c, spec.family, spec.to_json(), spec.family_key())
        for cid, tier in (("c-1", "nf4"), ("c-2", "nf4"), ("c-3", "fp32")):
            rec = ClientRecord(cid, spec.family, tier, spec.to_json(), spec.spec_hash)
            st.insert_client(c, rec, f"hash-{cid}")
        st.insert_round(c, 1, 0.0, 1.0)
        st.put_model_row(c, "global", 0, "d0", 10)
        st.put_model_row(c, "global", 0, "d1", 11, replace=True)
        st.put_meta(c, "global_schema", "{}")
    assert st.get_meta("global_schema") == "{}"
    assert st.clients_by_tier() == [(spec.family, "fp32", 1), (spec.family, "nf4", 2)]
    assert set(st.specs_of(["c-1", "c-3", "c-9"])) == {"c-1", "c-3"}
    assert st.specs_of([]) == {}
    assert st.latest_model("global") == (0, "d1")
    ups = [
        UpdateRecord(1, "c-1", spec.family, "nf4", 1, "a" * 64, 5, {"loss": 1.0}),
        UpdateRecord(1, "c-2", spec.family, "nf4", 3, "b" * 64, 5, {"loss": 2.0, "acc": 0.5}),
    ]
    with st.transaction() as c:
        for u in ups:
            st.insert_update(c, u)
        assert st.count_updates(1, c) == 2 and st.count_updates(1) == 0  # not yet committed
        st.write_round_metrics(c, 1, round_metric_rows(ups))
    assert st.updates(1) == ups and st.update_of(1, "c-2") == ups[1]
    metrics = {(f, t, k): v for _, f, t, k, v in st.round_metrics_rows()}
    assert metrics[(spec.family, "nf4", "clients")] == 2.0
    assert metrics[(spec.family, "nf4", "num_samples")] == 4.0
    assert metrics[(spec.family, "nf4", "loss")] == pytest.approx((1.0 + 6.0) / 4)
    assert metrics[(spec.family, "nf4", "acc")] == 0.5  # only the client that reported it
    st.close()


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(record.getMessage())


def test_logs_are_emitted_only_after_commit(tmp_path: Path) -> None:
    st = Storage(tmp_path / "s", synchronous="OFF", fsync_blobs=False)
    coord = Coordinator(server_run(), st, JOIN_TOKEN)
    logger = logging.getLogger("edgetune.server")
    recorder, level = _Recorder(), logger.level
    logger.addHandler(recorder)
    logger.setLevel(logging.INFO)
    try:
        with coord._txn() as txn:
            txn.later("probe_event", n=1)
            assert recorder.events == []
        assert recorder.events == ["probe_event"]
        with pytest.raises(RuntimeError), coord._txn() as txn:
            txn.later("rolled_back_event")
            raise RuntimeError("boom")
        assert recorder.events == ["probe_event"]
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(level)
        st.close()


def test_round_metric_rows_per_family_and_tier() -> None:
    ups = [
        UpdateRecord(1, "a", "f1", "t1", 2, "x", 1, {"loss": 1.0}),
        UpdateRecord(1, "b", "f2", "t1", 1, "y", 1, {}),
    ]
    rows = round_metric_rows(ups)
    assert ("f1", "t1", "loss", 1.0) in rows and ("f2", "t1", "clients", 1.0) in rows
    assert not [r for r in rows if r[0] == "f2" and r[2] == "loss"]
    assert torch.tensor([r[3] for r in rows]).isfinite().all()
