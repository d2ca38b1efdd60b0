"""The round state machine: uploads, quorum/deadline handling, aggregation.

Round states: ``open`` (no upload yet) -> ``collecting`` -> ``aggregating`` -> ``closed``, or
``abandoned`` when the deadline passes without enough uploads and extensions are used up.
A background thread (``start``) checks quorum and deadlines; the aggregate, the round's
closing and the next round's opening commit in one SQLite transaction, so a killed server
restarts in the same round with every accepted update (an interrupted ``aggregating`` round is
simply aggregated again, deterministically).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
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
    encode_model,
)
from edgetune.strategies import make_strategy
from edgetune.strategies.aggregation import ClientUpdate, TensorDict
from edgetune.strategies.base import GLOBAL, Strategy, family_model

from .blobs import sha256_hex
from .final import write_finals
from .registry import Registry, Txn, hash_token, log, log_event
from .status import build_status
from .storage import ClientRecord, MetricRow, RoundRecord, Storage, UpdateRecord
from .validation import ApiError, validate_update

ACCEPTING = ("open", "collecting")


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
        self._counter_lock = threading.Lock()
        self._rate_lock = threading.Lock()  # registration times of the last minute
        self._registered_at: deque[float] = deque()
        # Uploads writing or recording a blob, by digest: a refused upload's blob is deleted
        # only when no other upload of the same bytes is between its write and its record.
        self._blob_lock = threading.Lock()
        self._blob_users: Counter[str] = Counter()
        self._bytes_out_pending = 0
        self._open_first_round()
        write_finals(run, storage)  # a server killed before writing them catches up
        removed = storage.collect_garbage()
        if removed:
            log_event("orphan_blobs_removed", count=removed)

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
        with self._lock, self._txn() as txn:
            summary = {"abandoned": True, "error": error[:500]}
            self.storage.end_round(txn.conn, rec.round_id, "abandoned", summary)
            txn.later("round_failed", round=rec.round_id, error=error[:500])
            self._maybe_open_next(txn, rec.round_id)

    def _open_first_round(self) -> None:
        with self._lock, self._txn() as txn:
            if self.storage.latest_round(txn.conn) is None:
                self._insert_round(txn, 1)

    def _insert_round(self, txn: Txn, round_id: int) -> None:
        t = time.time()
        deadline = t + self.config.round_timeout_s
        self.storage.insert_round(txn.conn, round_id, t, deadline)
        txn.later("round_opened", round=round_id, deadline=deadline)

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
            "seconds_left": 0.0 if self.finished(rec) else max(0.0, rec.deadline - time.time()),
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
            max_abs_value=self.config.max_abs_value,
        )
        received = self._store_and_record(client, round_id, digest, body, valid.meta)
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

    def _store_and_record(
        self, client: ClientRecord, round_id: int, digest: str, body: bytes, meta: UpdateMeta
    ) -> int:
        """Write the blob, record the update; a refused record leaves no orphan blob behind."""
        with self._blob_lock:
            self._blob_users[digest] += 1
        recorded = False
        try:
            self.storage.blobs.put(body, digest)
            received = self._record_update(client, round_id, digest, len(body), meta)
            recorded = True
            return received
        finally:
            with self._blob_lock:
                self._blob_users[digest] -= 1
                if not self._blob_users[digest]:
                    del self._blob_users[digest]
                    if not recorded:
                        self.storage.discard_blob(digest)

    def _record_update(
        self, client: ClientRecord, round_id: int, digest: str, size: int, meta: UpdateMeta
    ) -> int:
        """Insert the update row (re-checking round and duplicates under the lock); count."""
        record = UpdateRecord(round_id, client.client_id, client.family, client.tier,
                              meta.num_samples, digest, size, dict(meta.metrics))  # fmt: skip
        with self._lock, self._txn() as txn:
            self._check_duplicate(client, round_id, digest)
            rec = self.current_round()
            if round_id != rec.round_id or rec.state not in ACCEPTING:
                raise self._round_conflict(round_id, rec)
            self.storage.insert_update(txn.conn, record)
            self.storage.mark_round_state(txn.conn, round_id, "collecting", only_from="open")
            self.storage.bump_counter(txn.conn, "bytes_in", size)
            self.storage.bump_counter(txn.conn, "uploads", 1)
            return self.storage.count_updates(round_id, txn.conn)

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
        with self._txn() as txn:
            self.storage.mark_round_state(txn.conn, rec.round_id, "aggregating")
        log_event("round_aggregating", round=rec.round_id, updates=n, quorum=reached)
        return True

    def _deadline_short(self, rec: RoundRecord, n: int, now: float) -> None:
        cfg = self.config
        with self._txn() as txn:
            if cfg.on_deadline == "extend" and rec.extensions < cfg.max_extensions:
                self.storage.extend_round(txn.conn, rec.round_id, now + cfg.round_timeout_s)
                txn.later(
                    "round_extended", round=rec.round_id, updates=n, extension=rec.extensions + 1
                )
                return
            summary = {"abandoned": True, "updates": n}
            self.storage.end_round(txn.conn, rec.round_id, "abandoned", summary, closed_at=now)
            txn.later("round_abandoned", round=rec.round_id, updates=n)
            self._maybe_open_next(txn, rec.round_id)

    def _maybe_open_next(self, txn: Txn, round_id: int) -> None:
        if round_id < self.run.rounds:
            self._insert_round(txn, round_id + 1)
        else:
            txn.later("training_finished", rounds=round_id)

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
            data = encode_model(tensors, round_id, fam_spec)
            blobs[name] = (self.storage.blobs.put(data), len(data))
        skipped = failed + result.skipped
        summary = {**result.summary, "updates": len(records), "skipped": skipped}
        summary["seconds"] = round(time.perf_counter() - t0, 4)
        with self._lock, self._txn() as txn:
            for name, (digest, size) in blobs.items():
                self.storage.put_model_row(txn.conn, name, round_id, digest, size, replace=True)
            self.storage.write_round_metrics(txn.conn, round_id, round_metric_rows(records))
            self.storage.end_round(txn.conn, round_id, "closed", summary)
            txn.later("round_closed", round=round_id, **summary)
            self._maybe_open_next(txn, round_id)
        write_finals(self.run, self.storage)  # <state>/final/<family>/, after every round

    def _specs_of(self, records: Sequence[UpdateRecord]) -> dict[str, AdapterSpec]:
        specs = self.storage.specs_of(r.client_id for r in records)
        return {client_id: AdapterSpec.from_json(text) for client_id, text in specs.items()}

    def status(self) -> dict[str, Any]:
        """Rounds, participants, clients per family/tier, bytes in/out, per-family metrics."""
        return build_status(
            self.storage,
            strategy=self.strategy.name,
            current=self.round_info(),
            bytes_out=self.bytes_out(),
        )


def round_metric_rows(records: Sequence[UpdateRecord]) -> list[MetricRow]:
    """Per (family, tier): clients, num_samples and the sample-weighted mean of each metric."""
    groups: dict[tuple[str, str], list[UpdateRecord]] = {}
    for r in records:
        groups.setdefault((r.family, r.tier), []).append(r)
    out: list[MetricRow] = []
    for (family, tier), rs in groups.items():
        values = {"clients": float(len(rs)), "num_samples": float(sum(r.num_samples for r in rs))}
        for key in sorted({k for r in rs for k in r.metrics}):
            have = [r for r in rs if key in r.metrics]
            weight = sum(r.num_samples for r in have)
            values[key] = sum(r.metrics[key] * r.num_samples for r in have) / weight
        out += [(family, tier, key, value) for key, value in values.items()]
    return out


class IdempotentRetry(Exception):
    """An identical retry of an accepted upload (answered with 200, nothing stored)."""

    def __init__(self, round_id: int, digest: str) -> None:
        super().__init__(f"round {round_id}: identical upload already accepted")
        self.round_id = round_id
        self.digest = digest
