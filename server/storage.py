"""Durable server state: SQLite (WAL) for records, content-addressed blob files for tensors.

Blob files (``blobs.BlobStore``) are named by the sha256 of their bytes and written atomically;
records reference blobs by hash, and a blob written before a crash but never referenced is
harmless (``collect_garbage`` removes it at start-up).

All SQL of the server lives in this module. Reads of committed state are plain methods
(``storage.updates(round_id)``); every state change is one SQLite transaction, and the methods
that write take its connection::

    with storage.transaction() as c:
        storage.insert_round(c, 2, opened_at, deadline)
        storage.bump_counter(c, "uploads", 1)
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .blobs import BlobStore
from .records import ClientRecord, RoundRecord, UpdateRecord

#: Tables added later (``family_cards``) are created by ``CREATE TABLE IF NOT EXISTS`` in an
#: older state dir too, so the version changes only when an existing table changes.
SCHEMA_VERSION = 1
#: Read-only SQLite connections open at once (each holds a few file descriptors).
MAX_READERS = 8
ROUND_STATES = ("open", "collecting", "aggregating", "closed", "abandoned")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS families(
    family TEXT PRIMARY KEY, spec_json TEXT NOT NULL, family_key TEXT NOT NULL,
    created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS clients(
    client_id TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE,
    family TEXT NOT NULL REFERENCES families(family), tier TEXT NOT NULL,
    spec_json TEXT NOT NULL, spec_hash TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rounds(
    round_id INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('open','collecting','aggregating','closed','abandoned')),
    opened_at REAL NOT NULL, deadline REAL NOT NULL, extensions INTEGER NOT NULL DEFAULT 0,
    closed_at REAL, summary_json TEXT);
CREATE TABLE IF NOT EXISTS updates(
    round_id INTEGER NOT NULL REFERENCES rounds(round_id),
    client_id TEXT NOT NULL REFERENCES clients(client_id),
    family TEXT NOT NULL, tier TEXT NOT NULL, num_samples INTEGER NOT NULL CHECK (num_samples > 0),
    sha256 TEXT NOT NULL, nbytes INTEGER NOT NULL, metrics_json TEXT NOT NULL,
    received_at REAL NOT NULL, PRIMARY KEY (round_id, client_id));
CREATE TABLE IF NOT EXISTS models(
    name TEXT NOT NULL, version INTEGER NOT NULL, sha256 TEXT NOT NULL, nbytes INTEGER NOT NULL,
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS round_metrics(
    round_id INTEGER NOT NULL, family TEXT NOT NULL, tier TEXT NOT NULL, key TEXT NOT NULL,
    value REAL NOT NULL, PRIMARY KEY (round_id, family, tier, key));
CREATE TABLE IF NOT EXISTS counters(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS family_cards(
    family TEXT PRIMARY KEY REFERENCES families(family), card_json TEXT NOT NULL,
    created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS revoked(
    client_id TEXT PRIMARY KEY REFERENCES clients(client_id), revoked_at REAL NOT NULL);
"""


#: One ``round_metrics`` row of a round: (family, tier, key, value).
MetricRow = tuple[str, str, str, float]


class Storage:
    """SQLite (WAL) state plus a blob store, safe to share between threads (one lock)."""

    def __init__(
        self, state_dir: str | Path, synchronous: str = "FULL", fsync_blobs: bool = True
    ) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.state_dir / "server.sqlite3"
        self.blobs = BlobStore(self.state_dir / "blobs", fsync=fsync_blobs)
        self._lock = threading.RLock()
        # Read-only connections, pooled: at most MAX_READERS open, whatever the thread pool does
        # (one per worker thread leaked a file descriptor each time uvicorn replaced a thread).
        self._idle: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._readers: list[sqlite3.Connection] = []
        self._reader_slots = threading.BoundedSemaphore(MAX_READERS)
        self._conn = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA busy_timeout=5000")
        with self.transaction():
            self._create_schema()

    def _create_schema(self) -> None:
        for stmt in _SCHEMA.split(";"):
            if stmt.strip():
                self._conn.execute(stmt)
        row = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self._conn.execute(
                "INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        elif int(row["value"]) != SCHEMA_VERSION:
            raise RuntimeError(f"state schema version {row['value']} != supported {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
            self._conn.close()

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """A pooled read-only connection: WAL readers never wait for the writer's fsync."""
        with self._reader_slots:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._open_reader()
            try:
                yield conn
            finally:
                self._idle.put(conn)

    def _open_reader(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA query_only=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        with self._lock:
            self._readers.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: committed on success, rolled back on any exception."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Read committed state (a transaction's own uncommitted writes are not visible)."""
        with self._reader() as conn:
            return conn.execute(sql, params).fetchall()

    def collect_garbage(self) -> int:
        """Delete blob files no record references (start-up only: a blob written just before
        a crash whose transaction never committed, or a rejected race). Returns the count."""
        with self._lock:
            used = {
                r[0]
                for r in self._conn.execute(
                    "SELECT sha256 FROM updates UNION SELECT sha256 FROM models"
                )
            }
            removed = 0
            for path in self.blobs.root.glob("*.safetensors"):
                if path.name.split(".", 1)[0] not in used:
                    path.unlink()
                    removed += 1
            return removed

    def discard_blob(self, digest: str) -> bool:
        """Delete one blob file if no record references it (a refused upload's). True if gone."""
        with self._lock:
            refs = self._conn.execute(
                "SELECT 1 FROM updates WHERE sha256=? UNION SELECT 1 FROM models WHERE sha256=?",
                (digest, digest),
            ).fetchone()
            if refs is not None:
                return False
            self.blobs.path(digest).unlink(missing_ok=True)
            return True

    # -- meta ----------------------------------------------------------------------------
    def get_meta(self, key: str, conn: sqlite3.Connection | None = None) -> str | None:
        """A meta value: committed state, or as seen inside the transaction ``conn``."""
        rows = self._read(conn, "SELECT value FROM meta WHERE key=?", (key,))
        return rows[0]["value"] if rows else None

    def put_meta(self, conn: sqlite3.Connection, key: str, value: str) -> None:
        conn.execute("INSERT INTO meta VALUES (?, ?)", (key, value))

    def _read(
        self, conn: sqlite3.Connection | None, sql: str, params: tuple[Any, ...] = ()
    ) -> list[sqlite3.Row]:
        return self._query(sql, params) if conn is None else conn.execute(sql, params).fetchall()

    # -- families and clients ------------------------------------------------------------
    def family_spec(self, family: str) -> str | None:
        rows = self._query("SELECT spec_json FROM families WHERE family=?", (family,))
        return rows[0]["spec_json"] if rows else None

    def families(self) -> list[str]:
        return [r["family"] for r in self._query("SELECT family FROM families ORDER BY family")]

    def pin_family(
        self, conn: sqlite3.Connection, family: str, spec_json: str, family_key: str
    ) -> None:
        conn.execute(
            "INSERT INTO families VALUES (?, ?, ?, ?)", (family, spec_json, family_key, now())
        )

    def family_card(self, family: str, conn: sqlite3.Connection | None = None) -> str | None:
        """The card (class names) pinned for ``family`` by its first client that sent one."""
        rows = self._read(conn, "SELECT card_json FROM family_cards WHERE family=?", (family,))
        return rows[0]["card_json"] if rows else None

    def pin_card(self, conn: sqlite3.Connection, family: str, card_json: str) -> None:
        conn.execute("INSERT INTO family_cards VALUES (?, ?, ?)", (family, card_json, now()))

    def insert_client(self, conn: sqlite3.Connection, rec: ClientRecord, token_hash: str) -> None:
        conn.execute(
            "INSERT INTO clients VALUES (?, ?, ?, ?, ?, ?, ?)",
            (rec.client_id, token_hash, rec.family, rec.tier, rec.spec_json, rec.spec_hash, now()),
        )

    def client_by_token_hash(self, token_hash: str) -> tuple[ClientRecord, str] | None:
        rows = self._query(
            "SELECT c.*, r.revoked_at FROM clients c LEFT JOIN revoked r USING (client_id) "
            "WHERE c.token_hash=?",
            (token_hash,),
        )
        if not rows:
            return None
        r = rows[0]
        rec = ClientRecord(
            r["client_id"], r["family"], r["tier"], r["spec_json"], r["spec_hash"],
            r["created_at"], r["revoked_at"] is not None,
        )  # fmt: skip
        return rec, r["token_hash"]

    def revoke_client(self, conn: sqlite3.Connection, client_id: str) -> bool:
        """Revoke a client's token for good; False when no such client is registered."""
        if conn.execute("SELECT 1 FROM clients WHERE client_id=?", (client_id,)).fetchone() is None:
            return False
        conn.execute("INSERT OR IGNORE INTO revoked VALUES (?, ?)", (client_id, now()))
        return True

    def count_clients(self) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM clients")[0]["n"])

    def clients_by_tier(self) -> list[tuple[str, str, int]]:
        """(family, tier, number of clients), ordered by family and tier."""
        rows = self._query(
            "SELECT family, tier, COUNT(*) AS n FROM clients GROUP BY family, tier "
            "ORDER BY family, tier"
        )
        return [(r["family"], r["tier"], int(r["n"])) for r in rows]

    def specs_of(self, client_ids: Iterable[str]) -> dict[str, str]:
        """client id -> registered spec JSON, for the ids given (unknown ids are left out)."""
        ids = sorted(set(client_ids))
        marks = ",".join("?" * len(ids))
        rows = self._query(
            f"SELECT client_id, spec_json FROM clients WHERE client_id IN ({marks})", tuple(ids)
        )
        return {r["client_id"]: r["spec_json"] for r in rows}

    # -- rounds --------------------------------------------------------------------------
    @staticmethod
    def _round(row: sqlite3.Row) -> RoundRecord:
        summary = json.loads(row["summary_json"]) if row["summary_json"] else None
        return RoundRecord(
            row["round_id"],
            row["state"],
            row["opened_at"],
            row["deadline"],
            row["extensions"],
            row["closed_at"],
            summary,
        )

    def latest_round(self, conn: sqlite3.Connection | None = None) -> RoundRecord | None:
        rows = self._read(conn, "SELECT * FROM rounds ORDER BY round_id DESC LIMIT 1")
        return self._round(rows[0]) if rows else None

    def rounds(self) -> list[RoundRecord]:
        return [self._round(r) for r in self._query("SELECT * FROM rounds ORDER BY round_id")]

    def insert_round(
        self, conn: sqlite3.Connection, round_id: int, opened_at: float, deadline: float
    ) -> None:
        conn.execute(
            "INSERT INTO rounds(round_id, state, opened_at, deadline) VALUES (?, 'open', ?, ?)",
            (round_id, opened_at, deadline),
        )

    def mark_round_state(
        self, conn: sqlite3.Connection, round_id: int, state: str, only_from: str | None = None
    ) -> None:
        """Set a round's state (only when it is in state ``only_from``, if given)."""
        if state not in ROUND_STATES:
            raise ValueError(f"unknown round state {state!r}")
        sql, params = "UPDATE rounds SET state=? WHERE round_id=?", (state, round_id)
        if only_from is not None:
            sql, params = sql + " AND state=?", (*params, only_from)
        conn.execute(sql, params)

    def end_round(
        self,
        conn: sqlite3.Connection,
        round_id: int,
        state: str,
        summary: Mapping[str, Any],
        closed_at: float | None = None,
    ) -> None:
        """Close (``closed``) or abandon (``abandoned``) a round with its summary."""
        if state not in ("closed", "abandoned"):
            raise ValueError(f"a round ends closed or abandoned, not {state!r}")
        conn.execute(
            "UPDATE rounds SET state=?, closed_at=?, summary_json=? WHERE round_id=?",
            (state, now() if closed_at is None else closed_at, json.dumps(summary), round_id),
        )

    def extend_round(self, conn: sqlite3.Connection, round_id: int, deadline: float) -> None:
        conn.execute(
            "UPDATE rounds SET deadline=?, extensions=extensions+1 WHERE round_id=?",
            (deadline, round_id),
        )

    # -- updates -------------------------------------------------------------------------
    @staticmethod
    def _update(r: sqlite3.Row) -> UpdateRecord:
        return UpdateRecord(
            r["round_id"],
            r["client_id"],
            r["family"],
            r["tier"],
            r["num_samples"],
            r["sha256"],
            r["nbytes"],
            json.loads(r["metrics_json"]),
        )

    def updates(self, round_id: int) -> list[UpdateRecord]:
        """A round's updates ordered by content hash (independent of arrival and client ids)."""
        rows = self._query(
            "SELECT * FROM updates WHERE round_id=? ORDER BY sha256, client_id", (round_id,)
        )
        return [self._update(r) for r in rows]

    def update_of(self, round_id: int, client_id: str) -> UpdateRecord | None:
        rows = self._query(
            "SELECT * FROM updates WHERE round_id=? AND client_id=?", (round_id, client_id)
        )
        return self._update(rows[0]) if rows else None

    def count_updates(self, round_id: int, conn: sqlite3.Connection | None = None) -> int:
        rows = self._read(conn, "SELECT COUNT(*) AS n FROM updates WHERE round_id=?", (round_id,))
        return int(rows[0]["n"])

    def insert_update(self, conn: sqlite3.Connection, rec: UpdateRecord) -> None:
        conn.execute(
            "INSERT INTO updates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (rec.round_id, rec.client_id, rec.family, rec.tier, rec.num_samples, rec.sha256,
             rec.nbytes, json.dumps(rec.metrics, sort_keys=True), now()),
        )  # fmt: skip

    # -- models --------------------------------------------------------------------------
    def latest_model(self, name: str, as_of: int | None = None) -> tuple[int, str] | None:
        """(version, sha256) of the newest model ``name``, or the newest with version <= as_of."""
        bound = (1 << 62) if as_of is None else as_of
        rows = self._query(
            "SELECT version, sha256 FROM models WHERE name=? AND version<=? "
            "ORDER BY version DESC LIMIT 1",
            (name, bound),
        )
        return (rows[0]["version"], rows[0]["sha256"]) if rows else None

    def put_model_row(
        self,
        conn: sqlite3.Connection,
        name: str,
        version: int,
        digest: str,
        nbytes: int,
        *,
        replace: bool = False,
    ) -> None:
        """Record model ``name`` at ``version`` (its blob is already stored)."""
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        conn.execute(f"{verb} INTO models VALUES (?, ?, ?, ?)", (name, version, digest, nbytes))

    # -- per-round metrics ---------------------------------------------------------------
    def write_round_metrics(
        self, conn: sqlite3.Connection, round_id: int, rows: Iterable[MetricRow]
    ) -> None:
        conn.executemany(
            "INSERT OR REPLACE INTO round_metrics VALUES (?, ?, ?, ?, ?)",
            [(round_id, *row) for row in rows],
        )

    def round_metrics_rows(self) -> list[tuple[int, str, str, str, float]]:
        """(round, family, tier, key, value) ordered by round, family, tier and key."""
        rows = self._query("SELECT * FROM round_metrics ORDER BY round_id, family, tier, key")
        return [(r["round_id"], r["family"], r["tier"], r["key"], r["value"]) for r in rows]

    # -- counters ------------------------------------------------------------------------
    def counter(self, key: str) -> int:
        rows = self._query("SELECT value FROM counters WHERE key=?", (key,))
        return int(rows[0]["value"]) if rows else 0

    def bump_counter(self, conn: sqlite3.Connection, key: str, delta: int) -> None:
        """Add ``delta`` to a counter inside the caller's transaction."""
        conn.execute(
            "INSERT INTO counters(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = value + ?",
            (key, delta, delta),
        )

    def add_counter(self, key: str, delta: int) -> None:
        """Add ``delta`` to a counter in a transaction of its own."""
        with self.transaction() as c:
            self.bump_counter(c, key, delta)


def now() -> float:
    return time.time()
