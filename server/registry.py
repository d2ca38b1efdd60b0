"""Client registration, authentication, family pinning and model downloads.

``Registry`` is the half of the coordinator that deals with clients and stored models; the
round state machine (``rounds.Coordinator``) extends it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from sqlite3 import Connection
from typing import Any

from edgetune.config import RunConfig, ServerConfig
from edgetune.protocol import (
    MAX_HEADER_BYTES,
    AdapterSpec,
    ClientCard,
    ProtocolError,
    decode_payload,
    encode_model,
    initial_tensors,
)
from edgetune.strategies.aggregation import TensorDict
from edgetune.strategies.base import GLOBAL, Strategy, family_model

from .storage import ClientRecord, Storage
from .validation import ApiError

log = logging.getLogger("edgetune.server")


def hash_token(token: str) -> str:
    """sha256 of a high-entropy random token (no salt/KDF needed for 256-bit secrets)."""
    return hashlib.sha256(token.encode()).hexdigest()


def log_event(event: str, **fields: Any) -> None:
    """One structured log line (JSON via ``cli.JsonFormatter``)."""
    log.info(event, extra={"event": event, "fields": fields})


class Txn:
    """An open transaction: ``conn`` for Storage's writing methods, and the log events that
    are emitted only once it has committed (none when it rolls back)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.events: list[tuple[str, dict[str, Any]]] = []

    def later(self, event: str, **fields: Any) -> None:
        """Log ``event`` after the commit."""
        self.events.append((event, fields))


class Registry:
    """Auth, registration and downloads (the state is set up by ``rounds.Coordinator``)."""

    run: RunConfig
    config: ServerConfig
    storage: Storage
    strategy: Strategy
    _join_hash: str
    _lock: threading.Lock
    _counter_lock: threading.Lock
    _rate_lock: threading.Lock
    _registered_at: deque[float]
    _bytes_out_pending: int

    @contextmanager
    def _txn(self) -> Iterator[Txn]:
        """One storage transaction whose ``later`` events are logged after the commit."""
        with self.storage.transaction() as conn:
            txn = Txn(conn)
            yield txn
        for event, fields in txn.events:
            log_event(event, **fields)

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
        client, ttl = found[0], self.config.token_ttl_s
        if client.revoked:
            raise ApiError(401, "token_revoked", f"the token of {client.client_id} was revoked")
        if ttl and time.time() - client.created_at > ttl:
            raise ApiError(
                401, "token_expired", f"the token of {client.client_id} expired after {ttl:g} s"
            )
        return client

    def revoke(self, join_token: str, client_id: str) -> dict[str, Any]:
        """Revoke a client's token (join token only); its uploads so far stay counted."""
        self.check_join_token(join_token)
        with self._lock, self._txn() as txn:
            if not self.storage.revoke_client(txn.conn, client_id):
                raise ApiError(404, "no_such_client", f"no client {client_id!r} on this server")
            txn.later("client_revoked", client=client_id)
        return {"revoked": client_id}

    def status_reader(self, token: str) -> ClientRecord | None:
        """Who reads ``/v1/status``: None for the join token (everything), else the client
        (whose view names no other client)."""
        if hmac.compare_digest(hash_token(token), self._join_hash):
            return None
        return self.authenticate(token)

    # -- registration ----------------------------------------------------------------------
    def register(
        self,
        join_token: str,
        spec_data: Mapping[str, Any],
        tier: str,
        card_data: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A new client of ``spec_data``; its card (class names), when sent, must describe that
        spec and agree with the card its family's first client pinned (409 otherwise)."""
        self.check_join_token(join_token)
        try:
            spec = AdapterSpec.from_dict(spec_data)
            card = None if card_data is None else ClientCard.from_dict(card_data)
            if card is not None:
                card.check_spec(spec)
        except ProtocolError as exc:
            raise ApiError(422, exc.code, exc.message) from exc
        self._check_cost(spec)
        self._check_rate()
        client_id, token = f"c-{secrets.token_hex(8)}", secrets.token_urlsafe(32)
        record = ClientRecord(client_id, spec.family, tier, spec.to_json(), spec.spec_hash)
        with self._lock, self._txn() as txn:
            pinned_json = self.storage.family_spec(spec.family)
            pinned = AdapterSpec.from_json(pinned_json) if pinned_json else None
            reason = self.strategy.check_spec(spec, pinned)
            if reason is not None:
                raise ApiError(409 if pinned else 422, "spec_mismatch", reason)
            self._check_room(pinned is None)
            if pinned is None:
                self._pin_family(txn, spec)
            if card is not None:
                self._pin_card(txn, card)
            self.storage.insert_client(txn.conn, record, hash_token(token))
        log_event("client_registered", client=client_id, family=spec.family, tier=tier)
        return {
            "client_id": client_id,
            "token": token,
            "family": spec.family,
            "spec": spec.to_dict(),
            "tier": tier,
        }

    def _pin_card(self, txn: Txn, card: ClientCard) -> None:
        """Under the lock: pin the family's first card, or check ``card`` against it."""
        pinned_json = self.storage.family_card(card.family, txn.conn)
        if pinned_json is None:
            self.storage.pin_card(txn.conn, card.family, card.to_json())
            txn.later("card_pinned", family=card.family, classes=len(card.classes))
            return
        reason = card.disagreement(ClientCard.from_json(pinned_json))
        if reason is not None:
            raise ApiError(409, "classes_mismatch", reason)

    def _check_rate(self) -> None:
        """At most ``server.registrations_per_minute`` registration attempts (with a valid join
        token and spec) in any 60 s: a sliding window over their times."""
        now, limit = time.monotonic(), self.config.registrations_per_minute
        with self._rate_lock:
            while self._registered_at and now - self._registered_at[0] > 60.0:
                self._registered_at.popleft()
            if len(self._registered_at) >= limit:
                raise ApiError(
                    429,
                    "too_many_registrations",
                    f"more than {limit} registration attempts in a minute "
                    "(server.registrations_per_minute); retry later",
                )
            self._registered_at.append(now)

    def _check_room(self, new_family: bool) -> None:
        """Under the lock: the client (and its family, if new) fit the server's limits."""
        if self.storage.count_clients() >= self.config.max_clients:
            raise ApiError(
                422, "limit_reached", f"server.max_clients={self.config.max_clients} reached"
            )
        if new_family and len(self.storage.families()) >= self.config.max_families:
            raise ApiError(
                422, "limit_reached", f"server.max_families={self.config.max_families} reached"
            )

    def _check_cost(self, spec: AdapterSpec) -> None:
        """Refuse, before allocating anything, a spec whose models this server cannot hold or
        serve: values over ``server.max_upload_bytes`` or a header over the payload limit."""
        values, header = spec.wire_cost()
        limit = self.config.max_upload_bytes
        if values > limit or header > MAX_HEADER_BYTES:
            raise ApiError(
                422,
                "spec_too_large",
                f"a model of this spec holds {values} bytes of values and a {header}-byte header; "
                f"this server takes at most {limit} bytes (server.max_upload_bytes) and a "
                f"{MAX_HEADER_BYTES}-byte header",
            )

    def _pin_family(self, txn: Txn, spec: AdapterSpec) -> None:
        glob, fam = initial_tensors(spec, self.run.seed)
        if self.strategy.uses_global:
            schema = json.dumps({n: list(t.shape) for n, t in sorted(glob.items())})
            pinned = self.storage.get_meta("global_schema", txn.conn)
            if pinned is None:
                self.storage.put_meta(txn.conn, "global_schema", schema)
                self._put_model(txn, GLOBAL, 0, glob, spec=None)
            elif pinned != schema:
                raise ApiError(
                    409,
                    "global_mismatch",
                    f"global branch {schema} != pinned {pinned} (rank/anchors)",
                )
        self.storage.pin_family(txn.conn, spec.family, spec.to_json(), spec.family_key())
        self._put_model(txn, family_model(spec.family), 0, fam, spec=spec)
        txn.later("family_pinned", family=spec.family, spec_hash=spec.spec_hash)

    def _put_model(
        self, txn: Txn, name: str, version: int, tensors: TensorDict, spec: AdapterSpec | None
    ) -> None:
        data = encode_model(tensors, version, spec)
        digest = self.storage.blobs.put(data)
        self.storage.put_model_row(txn.conn, name, version, digest, len(data))

    def _family_spec(self, name: str) -> AdapterSpec | None:
        if name == GLOBAL:
            return None
        text = self.storage.family_spec(name.split("/", 1)[1])
        return AdapterSpec.from_json(text) if text else None

    # -- downloads and status ---------------------------------------------------------------
    def download(
        self, name: str, client: ClientRecord, as_of: int | None = None
    ) -> tuple[bytes, int]:
        """Safetensors bytes of model ``name`` as seen by ``client``: the latest, or as it was
        after round ``as_of`` (newest version <= as_of). Returns (bytes, version)."""
        latest = self.storage.latest_model(name, as_of)
        if latest is None:
            what = f"model {name!r}" + ("" if as_of is None else f" at or before round {as_of}")
            raise ApiError(404, "no_such_model", f"no {what} on this server")
        version, digest = latest
        data = self.storage.blobs.get(digest)
        spec = AdapterSpec.from_json(client.spec_json)
        if name != GLOBAL and self.strategy.per_client_views:
            tensors = decode_payload(data).tensors
            view = self.strategy.download_view(tensors, spec)
            if view is not tensors:
                data = encode_model(view, version, self._family_spec(name))
        with self._counter_lock:
            self._bytes_out_pending += len(data)
        return data, version

    def flush_counters(self) -> None:
        """Persist download byte counts (batched: a download costs no fsync of its own; a
        SIGKILL loses at most one scheduler tick of this statistic, never model state)."""
        with self._counter_lock:
            pending, self._bytes_out_pending = self._bytes_out_pending, 0
        if pending:
            self.storage.add_counter("bytes_out", pending)

    def bytes_out(self) -> int:
        with self._counter_lock:
            return self.storage.counter("bytes_out") + self._bytes_out_pending
