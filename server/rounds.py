"""The round state machine: uploads, quorum/deadline handling, aggregation.

Round states: ``open`` (no upload yet) -> ``collecting`` -> ``aggregating`` -> ``closed``, or
``abandoned`` when the deadline passes without enough uploads and extensions are used up.
A background thread (``start``) checks quorum and deadlines; the aggregate, the round's
closing and the next round's opening commit in one SQLite transaction, so a killed server
restarts in the same round with every accepted update (an interrupted ``aggregating`` round is
simply aggregated again, deterministically).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from edgetune.config import RunConfig
from edgetune.protocol import (
    META_COMPRESSION,
    AdapterSpec,
    ProtocolError,
    UpdateMeta,
    decode_payload,
    decompress_tensors,
)
from edgetune.strategies import make_strategy
from edgetune.strategies.aggregation import ClientUpdate, TensorDict
from edgetune.strategies.base import GLOBAL, Strategy, family_model

from .registry import Registry, hash_token, log, log_event
from .storage import ClientRecord, RoundRecord, Storage, UpdateRecord, bump_counter, sha256_hex
from .validation import ApiError, validate_update

ACCEPTING = ("open", "collecting")


class _Events(threading.local):
    def __init__(self) -> None:
        self.pending: list[tuple[str, dict[str, Any]]] = []


# Consecutive failed scheduler ticks before the current round is abandoned with the error.
MAX_STEP_FAILURES = 10


class Coordinator(Registry):
    """Owns the storage and the strategy; every public method is thread-safe."""

    def __init__(self, run: RunConfig, storage: Storage, join_token: str) -> None:
        self.run = run
        self.config = run.server
        self.quorum = run.quorum
        self.storage = storage
        self.strategy: Strategy = make_strategy(run)
        self._join_hash = hash_token(join_token)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._events = _Events()
        self._counter_lock = threading.Lock()
        self._bytes_out_pending = 0
        self._open_first_round()
        removed = storage.collect_garbage()
        if removed:
            log_event("orphan_blobs_removed", count=removed)

    # -- transactions with logs emitted only after commit ----------------------------------
    @contextmanager
    def _txn(self) -> Iterator[Any]:
        self._events.pending = []
        with self.storage.transaction() as conn:
            yield conn
        pending, self._events.pending = self._events.pending, []
        for event, fields in pending:
            log_event(event, **fields)

    def _later(self, event: str, **fields: Any) -> None:
        self._events.pending.append((event, fields))

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="edgetune-rounds", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush_counters()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._wake.wait(self.config.tick_s)
            self._wake.clear()
            try:
                self.flush_counters()
                self.step()
                failures = 0
            except Exception as exc:  # keep serving; the failure is logged with its traceback
                failures += 1
                log.exception("round step failed (%d in a row)", failures)
                if failures >= MAX_STEP_FAILURES:
                    self._abandon_failed_round(f"{type(exc).__name__}: {exc}")
                    failures = 0

    def _abandon_failed_round(self, error: str) -> None:
        """A round whose closing keeps raising (e.g. a corrupt stored model) is abandoned with
        the error in its summary, so clients move on instead of polling a stuck round."""
        rec = self.current_round()
        if self.finished(rec):
            return
        with self._lock, self._txn() as c:
            summary = json.dumps({"abandoned": True, "error": error[:500]})
            c.execute(
                "UPDATE rounds SET state='abandoned', closed_at=?, summary_json=? WHERE round_id=?",
                (time.time(), summary, rec.round_id),
            )
            self._later("round_failed", round=rec.round_id, error=error[:500])
            self._maybe_open_next(c, rec.round_id)

    def _open_first_round(self) -> None:
        with self._lock, self._txn() as c:
            if c.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == 0:
                self._insert_round(c, 1)

    def _insert_round(self, conn: Any, round_id: int) -> None:
        t = time.time()
        conn.execute(
            "INSERT INTO rounds(round_id, state, opened_at, deadline) VALUES (?, 'open', ?, ?)",
            (round_id, t, t + self.config.round_timeout_s),
        )
        self._later("round_opened", round=round_id, deadline=t + self.config.round_timeout_s)

    # -- rounds ----------------------------------------------------------------------------
    def current_round(self) -> RoundRecord:
        rec = self.storage.latest_round()
        assert rec is not None, "the first round is created at start-up"
        return rec

    def finished(self, rec: RoundRecord) -> bool:
        return rec.state in ("closed", "abandoned")

    def round_info(self, client: ClientRecord | None = None) -> dict[str, Any]:
        rec = self.current_round()
        info: dict[str, Any] = {
            "round": rec.round_id,
            "state": rec.state,
            "accepting": rec.state in ACCEPTING,
            "finished": self.finished(rec),
            "opened_at": rec.opened_at,
            "deadline": rec.deadline,
            "seconds_left": max(0.0, rec.deadline - time.time()),
            "min_clients": self.quorum,
            "received": self.storage.count_updates(rec.round_id),
            "config": self.strategy.configure_round(rec.round_id),
        }
        glob = self.storage.latest_model(GLOBAL)
        info["global_version"] = glob[0] if glob else None
        if client is not None:
            fam = self.storage.latest_model(family_model(client.family))
            info["family_version"] = fam[0] if fam else None
            info["uploaded"] = self.storage.update_of(rec.round_id, client.client_id) is not None
            info["downloads"] = {"family": f"/v1/families/{client.family}"}
            if self.strategy.uses_global:
                info["downloads"]["global"] = "/v1/global"
            info["upload"] = f"/v1/rounds/{rec.round_id}/updates/{client.client_id}"
        return info

    def _round_conflict(self, round_id: int, rec: RoundRecord) -> ApiError:
        why = "is not the current round" if round_id != rec.round_id else f"is {rec.state}"
        return ApiError(
            409, "round_closed", f"round {round_id} {why}; current round is {rec.round_id} ({rec.state})",
            current_round=rec.round_id, state=rec.state,
        )  # fmt: skip

    # -- uploads ---------------------------------------------------------------------------
    def submit_update(
        self, client: ClientRecord, round_id: int, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        """Validate, store and record one upload; (HTTP status, JSON body).

        An identical retry of an accepted upload is a 200 no-op, a different second upload
        from the same client in the same round a 409; nothing is stored unless valid.
        """
        try:
            return self._submit(client, round_id, body)
        except IdempotentRetry as dup:
            return 200, {"status": "duplicate", "round": dup.round_id, "sha256": dup.digest}

    def _submit(
        self, client: ClientRecord, round_id: int, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        digest = sha256_hex(body)
        self._check_duplicate(client, round_id, digest)
        rec = self.current_round()
        if round_id != rec.round_id or rec.state not in ACCEPTING:
            raise self._round_conflict(round_id, rec)
        spec = AdapterSpec.from_json(client.spec_json)
        valid = validate_update(
            body,
            spec,
            round_id,
            max_samples=self.config.max_num_samples,
            allowed_dtypes=self.config.allowed_dtypes,
        )
        self.storage.blobs.put(body, digest)
        received = self._record_update(client, round_id, digest, len(body), valid.meta)
        log_event(
            "update_accepted",
            round=round_id,
            client=client.client_id,
            family=client.family,
            bytes=len(body),
        )
        if received >= self.quorum:
            self._wake.set()
        return 201, {
            "status": "accepted",
            "round": round_id,
            "received": received,
            "sha256": digest,
        }

    def _record_update(
        self, client: ClientRecord, round_id: int, digest: str, size: int, meta: UpdateMeta
    ) -> int:
        """Insert the update row (re-checking round and duplicates under the lock); count."""
        with self._lock, self._txn() as c:
            self._check_duplicate(client, round_id, digest)
            rec = self.current_round()
            if round_id != rec.round_id or rec.state not in ACCEPTING:
                raise self._round_conflict(round_id, rec)
            c.execute(
                "INSERT INTO updates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (round_id, client.client_id, client.family, client.tier, meta.num_samples, digest,
                 size, json.dumps(meta.metrics, sort_keys=True), time.time()),
            )  # fmt: skip
            c.execute(
                "UPDATE rounds SET state='collecting' WHERE round_id=? AND state='open'",
                (round_id,),
            )
            bump_counter(c, "bytes_in", size)
            bump_counter(c, "uploads", 1)
            query = "SELECT COUNT(*) FROM updates WHERE round_id=?"
            return int(c.execute(query, (round_id,)).fetchone()[0])

    def _check_duplicate(self, client: ClientRecord, round_id: int, digest: str) -> None:
        prior = self.storage.update_of(round_id, client.client_id)
        if prior is None:
            return
        if prior.sha256 == digest:
            raise IdempotentRetry(round_id, digest)
        raise ApiError(
            409, "duplicate_upload", f"client {client.client_id} already uploaded a different update for round {round_id}",
            current_round=self.current_round().round_id,
        )  # fmt: skip

    # -- quorum, deadline, aggregation ------------------------------------------------------
    def step(self, now: float | None = None) -> None:
        """One scheduler tick: close, extend or abandon the current round as due."""
        now = time.time() if now is None else now
        with self._lock:
            rec = self.current_round()
            if self.finished(rec):
                return
            if rec.state != "aggregating" and not self._due(rec, now):
                return
        self._aggregate_and_close(rec.round_id)

    def _due(self, rec: RoundRecord, now: float) -> bool:
        """Under the lock: True when the round should aggregate now (marks it aggregating)."""
        n = self.storage.count_updates(rec.round_id)
        reached = n >= self.quorum
        if not reached and now < rec.deadline:
            return False
        if not reached and n < self.config.min_clients_at_deadline:
            self._deadline_short(rec, n, now)
            return False
        with self._txn() as c:
            c.execute("UPDATE rounds SET state='aggregating' WHERE round_id=?", (rec.round_id,))
        log_event("round_aggregating", round=rec.round_id, updates=n, quorum=reached)
        return True

    def _deadline_short(self, rec: RoundRecord, n: int, now: float) -> None:
        cfg = self.config
        with self._txn() as c:
            if cfg.on_deadline == "extend" and rec.extensions < cfg.max_extensions:
                c.execute(
                    "UPDATE rounds SET deadline=?, extensions=extensions+1 WHERE round_id=?",
                    (now + cfg.round_timeout_s, rec.round_id),
                )
                self._later(
                    "round_extended", round=rec.round_id, updates=n, extension=rec.extensions + 1
                )
                return
            summary = json.dumps({"abandoned": True, "updates": n})
            c.execute(
                "UPDATE rounds SET state='abandoned', closed_at=?, summary_json=? WHERE round_id=?",
                (now, summary, rec.round_id),
            )
            self._later("round_abandoned", round=rec.round_id, updates=n)
            self._maybe_open_next(c, rec.round_id)

    def _maybe_open_next(self, conn: Any, round_id: int) -> None:
        if round_id < self.run.rounds:
            self._insert_round(conn, round_id + 1)
        else:
            self._later("training_finished", rounds=round_id)

    def load_state(self) -> dict[str, TensorDict]:
        """Latest stored model entries as tensors (global and every family)."""
        names = [GLOBAL] if self.strategy.uses_global else []
        names += [family_model(f) for f in self.storage.families()]
        state = {}
        for name in names:
            latest = self.storage.latest_model(name)
            if latest is not None:
                state[name] = decode_payload(self.storage.blobs.get(latest[1])).tensors
        return state

    def _load_updates(
        self, records: Sequence[UpdateRecord]
    ) -> tuple[list[ClientUpdate], list[tuple[str, str]]]:
        updates, failed = [], []
        for r in records:
            try:
                payload = decode_payload(self.storage.blobs.get(r.sha256))
                compression = payload.metadata.get(META_COMPRESSION, "none")
                tensors = decompress_tensors(payload.tensors, compression)
            except (OSError, ProtocolError) as exc:
                log.error(
                    "update blob of %s in round %d unreadable: %s", r.client_id, r.round_id, exc
                )
                failed.append((r.client_id, f"blob unreadable: {exc}"))
                continue
            tensors = {k: v.to(torch.float32) for k, v in tensors.items()}
            updates.append(
                ClientUpdate(r.client_id, r.family, r.num_samples, tensors, r.tier, r.metrics)
            )
        return updates, failed

    def _aggregate_and_close(self, round_id: int) -> None:
        t0 = time.perf_counter()
        records = self.storage.updates(round_id)  # sorted by content hash: order-independent
        updates, failed = self._load_updates(records)
        specs = self._specs_of(records)
        result = self.strategy.aggregate_round(round_id, self.load_state(), updates, specs)
        blobs = {}
        for name, tensors in result.models.items():
            fam_spec = self._family_spec(name)
            data = self._encode_model(name, round_id, tensors, fam_spec)
            blobs[name] = (self.storage.blobs.put(data), len(data))
        skipped = failed + result.skipped
        summary = {**result.summary, "updates": len(records), "skipped": skipped}
        summary["seconds"] = round(time.perf_counter() - t0, 4)
        with self._lock, self._txn() as c:
            for name, (digest, size) in blobs.items():
                c.execute(
                    "INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?)",
                    (name, round_id, digest, size),
                )
            self._write_round_metrics(c, round_id, records)
            c.execute(
                "UPDATE rounds SET state='closed', closed_at=?, summary_json=? WHERE round_id=?",
                (time.time(), json.dumps(summary), round_id),
            )
            self._later("round_closed", round=round_id, **summary)
            self._maybe_open_next(c, round_id)

    def _specs_of(self, records: Sequence[UpdateRecord]) -> dict[str, AdapterSpec]:
        ids = sorted({r.client_id for r in records})
        rows = self.storage.query(
            f"SELECT client_id, spec_json FROM clients WHERE client_id IN ({','.join('?' * len(ids))})",
            tuple(ids),
        )
        return {r["client_id"]: AdapterSpec.from_json(r["spec_json"]) for r in rows}

    def _write_round_metrics(
        self, conn: Any, round_id: int, records: Sequence[UpdateRecord]
    ) -> None:
        groups: dict[tuple[str, str], list[UpdateRecord]] = {}
        for r in records:
            groups.setdefault((r.family, r.tier), []).append(r)
        for (family, tier), rs in groups.items():
            total = sum(r.num_samples for r in rs)
            rows = {"clients": float(len(rs)), "num_samples": float(total)}
            for key in sorted({k for r in rs for k in r.metrics}):
                have = [r for r in rs if key in r.metrics]
                rows[key] = sum(r.metrics[key] * r.num_samples for r in have) / sum(
                    r.num_samples for r in have
                )
            conn.executemany(
                "INSERT OR REPLACE INTO round_metrics VALUES (?, ?, ?, ?, ?)",
                [(round_id, family, tier, k, v) for k, v in rows.items()],
            )

    def status(self) -> dict[str, Any]:
        """Rounds, participants, clients per family/tier, bytes in/out, per-family metrics."""
        from .status import build_status

        return build_status(self)


class IdempotentRetry(Exception):
    """An identical retry of an accepted upload (answered with 200, nothing stored)."""

    def __init__(self, round_id: int, digest: str) -> None:
        super().__init__(f"round {round_id}: identical upload already accepted")
        self.round_id = round_id
        self.digest = digest
