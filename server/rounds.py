"""The round state machine: registration, uploads, quorum/deadline handling, aggregation.

Round states: ``open`` (no upload yet) -> ``collecting`` -> ``aggregating`` -> ``closed``, or
``abandoned`` when the deadline passes without enough uploads and extensions are used up.
A background thread (``start``) checks quorum and deadlines; the aggregate, the round's
closing and the next round's opening commit in one SQLite transaction, so a killed server
restarts in the same round with every accepted update (an interrupted ``aggregating`` round is
simply aggregated again, deterministically).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from edgetune.protocol import (
    META_FAMILY,
    META_KIND,
    META_ROUND,
    META_SPEC,
    PAYLOAD_FAMILY,
    PAYLOAD_GLOBAL,
    AdapterSpec,
    ProtocolError,
    decode_payload,
    encode_payload,
    initial_tensors,
)

from .aggregation import ClientUpdate, TensorDict
from .config import ServerConfig
from .storage import ClientRecord, RoundRecord, Storage, UpdateRecord, bump_counter, sha256_hex
from .strategy import GLOBAL, Strategy, family_model, make_strategy
from .validation import ApiError, validate_update

log = logging.getLogger("edgetune.server")

ACCEPTING = ("open", "collecting")


def hash_token(token: str) -> str:
    """sha256 of a high-entropy random token (no salt/KDF needed for 256-bit secrets)."""
    return hashlib.sha256(token.encode()).hexdigest()


def _event(event: str, **fields: Any) -> None:
    log.info(event, extra={"event": event, "fields": fields})


class _Events(threading.local):
    def __init__(self) -> None:
        self.pending: list[tuple[str, dict[str, Any]]] = []


class Coordinator:
    """Owns the storage and the strategy; every public method is thread-safe."""

    def __init__(self, config: ServerConfig, storage: Storage, join_token: str) -> None:
        self.config = config
        self.storage = storage
        self.strategy: Strategy = make_strategy(
            config.strategy,
            beta=config.beta,
            eta=config.eta,
            project=config.project_conflicts,
            seed=config.seed,
        )
        self._join_hash = hash_token(join_token)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._events = _Events()
        self._open_first_round()
        removed = storage.collect_garbage()
        if removed:
            _event("orphan_blobs_removed", count=removed)

    # -- transactions with logs emitted only after commit ----------------------------------
    @contextmanager
    def _txn(self) -> Iterator[Any]:
        self._events.pending = []
        with self.storage.transaction() as conn:
            yield conn
        pending, self._events.pending = self._events.pending, []
        for event, fields in pending:
            _event(event, **fields)

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

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.config.tick_s)
            self._wake.clear()
            try:
                self.step()
            except Exception:  # keep serving; the failure is logged with its traceback
                log.exception("round step failed")

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

    # -- auth ------------------------------------------------------------------------------
    def check_join_token(self, token: str) -> None:
        if not hmac.compare_digest(hash_token(token), self._join_hash):
            raise ApiError(401, "invalid_join_token", "the join token is not valid for this server")

    def authenticate(self, token: str) -> ClientRecord:
        digest = hash_token(token)
        found = self.storage.client_by_token_hash(digest)
        if found is None or not hmac.compare_digest(found[1], digest):
            raise ApiError(
                401, "invalid_token", "bearer token is not a token issued by this server"
            )
        return found[0]

    def check_status_token(self, token: str) -> None:
        """Status is readable with the join token or any client token."""
        if hmac.compare_digest(hash_token(token), self._join_hash):
            return
        self.authenticate(token)

    # -- registration ----------------------------------------------------------------------
    def register(self, join_token: str, spec_data: Mapping[str, Any], tier: str) -> dict[str, Any]:
        self.check_join_token(join_token)
        try:
            spec = AdapterSpec.from_dict(spec_data)
        except ProtocolError as exc:
            raise ApiError(422, exc.code, exc.message) from exc
        client_id, token = f"c-{secrets.token_hex(8)}", secrets.token_urlsafe(32)
        with self._lock, self._txn() as c:
            pinned_json = self.storage.family_spec(spec.family)
            pinned = AdapterSpec.from_json(pinned_json) if pinned_json else None
            reason = self.strategy.check_spec(spec, pinned)
            if reason is not None:
                raise ApiError(409 if pinned else 422, "spec_mismatch", reason)
            if pinned is None:
                self._pin_family(c, spec)
            c.execute(
                "INSERT INTO clients VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    client_id,
                    hash_token(token),
                    spec.family,
                    tier,
                    spec.to_json(),
                    spec.spec_hash,
                    time.time(),
                ),
            )
        _event("client_registered", client=client_id, family=spec.family, tier=tier)
        return {
            "client_id": client_id,
            "token": token,
            "family": spec.family,
            "spec": spec.to_dict(),
            "tier": tier,
        }

    def _pin_family(self, conn: Any, spec: AdapterSpec) -> None:
        glob, fam = initial_tensors(spec, self.config.seed)
        if self.strategy.uses_global:
            schema = json.dumps({n: list(t.shape) for n, t in sorted(glob.items())})
            row = conn.execute("SELECT value FROM meta WHERE key='global_schema'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('global_schema', ?)", (schema,))
                self._put_model(conn, GLOBAL, 0, glob, spec=None)
            elif row[0] != schema:
                raise ApiError(
                    409,
                    "global_mismatch",
                    f"global branch {schema} != pinned {row[0]} (rank/anchors)",
                )
        conn.execute(
            "INSERT INTO families VALUES (?, ?, ?, ?)",
            (spec.family, spec.to_json(), spec.family_key(), time.time()),
        )
        self._put_model(conn, family_model(spec.family), 0, fam, spec=spec)
        self._later("family_pinned", family=spec.family, spec_hash=spec.spec_hash)

    def _encode_model(
        self, name: str, version: int, tensors: TensorDict, spec: AdapterSpec | None
    ) -> bytes:
        meta = {
            META_KIND: PAYLOAD_GLOBAL if name == GLOBAL else PAYLOAD_FAMILY,
            META_ROUND: str(version),
        }
        if spec is not None:
            meta.update({META_FAMILY: spec.family, META_SPEC: spec.to_json()})
        return encode_payload(tensors, meta)

    def _put_model(
        self, conn: Any, name: str, version: int, tensors: TensorDict, spec: AdapterSpec | None
    ) -> None:
        data = self._encode_model(name, version, tensors, spec)
        digest = self.storage.blobs.put(data)
        conn.execute("INSERT INTO models VALUES (?, ?, ?, ?)", (name, version, digest, len(data)))

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
            "min_clients": self.config.min_clients,
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
        with self._lock, self._txn() as c:
            self._check_duplicate(client, round_id, digest)
            rec = self.current_round()
            if round_id != rec.round_id or rec.state not in ACCEPTING:
                raise self._round_conflict(round_id, rec)
            c.execute(
                "INSERT INTO updates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (round_id, client.client_id, client.family, client.tier, valid.meta.num_samples, digest,
                 len(body), json.dumps(valid.meta.metrics, sort_keys=True), time.time()),
            )  # fmt: skip
            c.execute(
                "UPDATE rounds SET state='collecting' WHERE round_id=? AND state='open'",
                (round_id,),
            )
            bump_counter(c, "bytes_in", len(body))
            bump_counter(c, "uploads", 1)
            received = c.execute(
                "SELECT COUNT(*) FROM updates WHERE round_id=?", (round_id,)
            ).fetchone()[0]
        _event(
            "update_accepted",
            round=round_id,
            client=client.client_id,
            family=client.family,
            bytes=len(body),
        )
        if received >= self.config.min_clients:
            self._wake.set()
        return 201, {
            "status": "accepted",
            "round": round_id,
            "received": received,
            "sha256": digest,
        }

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
        reached = n >= self.config.min_clients
        if not reached and now < rec.deadline:
            return False
        if not reached and n < self.config.min_clients_at_deadline:
            self._deadline_short(rec, n, now)
            return False
        with self._txn() as c:
            c.execute("UPDATE rounds SET state='aggregating' WHERE round_id=?", (rec.round_id,))
        _event("round_aggregating", round=rec.round_id, updates=n, quorum=reached)
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
        if self.config.max_rounds == 0 or round_id < self.config.max_rounds:
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
                tensors = decode_payload(self.storage.blobs.get(r.sha256)).tensors
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

    def _family_spec(self, name: str) -> AdapterSpec | None:
        if name == GLOBAL:
            return None
        text = self.storage.family_spec(name.split("/", 1)[1])
        return AdapterSpec.from_json(text) if text else None

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

    # -- downloads and status ---------------------------------------------------------------
    def download(self, name: str, client: ClientRecord) -> tuple[bytes, int]:
        """Safetensors bytes of the latest model ``name`` as seen by ``client``; (bytes, version)."""
        latest = self.storage.latest_model(name)
        if latest is None:
            raise ApiError(404, "no_such_model", f"no model {name!r} on this server")
        version, digest = latest
        data = self.storage.blobs.get(digest)
        spec = AdapterSpec.from_json(client.spec_json)
        if name != GLOBAL and self.strategy.per_client_views:
            tensors = decode_payload(data).tensors
            view = self.strategy.download_view(tensors, spec)
            if view is not tensors:
                data = self._encode_model(name, version, view, self._family_spec(name))
        self.storage.add_counter("bytes_out", len(data))
        return data, version

    def status(self) -> dict[str, Any]:
        rounds = []
        for r in self.storage.rounds():
            ups = self.storage.updates(r.round_id)
            rounds.append({
                "round": r.round_id, "state": r.state, "opened_at": r.opened_at, "deadline": r.deadline,
                "closed_at": r.closed_at, "extensions": r.extensions, "participants": sorted(u.client_id for u in ups),
                "families": sorted({u.family for u in ups}), "bytes_in": sum(u.nbytes for u in ups),
                "summary": r.summary,
            })  # fmt: skip
        clients = self.storage.query(
            "SELECT family, tier, COUNT(*) AS n FROM clients GROUP BY family, tier"
        )
        metrics = self.storage.query(
            "SELECT * FROM round_metrics ORDER BY round_id, family, tier, key"
        )
        per_family: dict[str, dict[str, Any]] = {}
        for m in metrics:
            fam = per_family.setdefault(m["family"], {})
            fam.setdefault(str(m["round_id"]), {}).setdefault(m["tier"], {})[m["key"]] = m["value"]
        return {
            "strategy": self.strategy.name,
            "current": self.round_info(),
            "rounds": rounds,
            "clients": [
                {"family": c["family"], "tier": c["tier"], "count": c["n"]} for c in clients
            ],
            "bytes_in": self.storage.counter("bytes_in"),
            "bytes_out": self.storage.counter("bytes_out"),
            "uploads": self.storage.counter("uploads"),
            "metrics": per_family,
        }


class IdempotentRetry(Exception):
    """An identical retry of an accepted upload (answered with 200, nothing stored)."""

    def __init__(self, round_id: int, digest: str) -> None:
        super().__init__(f"round {round_id}: identical upload already accepted")
        self.round_id = round_id
        self.digest = digest
