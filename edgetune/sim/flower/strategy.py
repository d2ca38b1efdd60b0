"""A Flower `Strategy` that runs any strategy of our registry (DESIGN.md section 6).

Flower's built-in strategies average one ArrayRecord whose keys every node shares; our
families hold different tensors, so this strategy keeps the model state itself (``global``
and ``family/<f>``, as our server stores it) and sends each node its own slice:

1. discovery: a ``query.describe`` round asks every node for its family, spec and tier (the
   ServerApp cannot read a node's config); each family's spec is pinned (the largest rank of
   the family, as our simulate pins the evaluator's), a node whose spec the strategy refuses is
   left out with one log line, and each family's round-0 tensors are made as our server makes
   them (`initial_tensors`, same seed);
2. per round: one ``train`` message per node with the global branch and its family's model
   (`Strategy.download_view` per node), the replies collected until the quorum or the round's
   deadline (``server.round_timeout_s``), each reply re-encoded into the bytes our HTTP
   server would have received and validated by the same code (`validate_update`); error
   replies, late and invalid ones are logged and skipped, never raised; the valid ones go,
   ordered by content hash as our server orders them, to the registry strategy's
   ``aggregate_round`` (the same pure aggregation functions);
3. after every round the strategy's own state is checkpointed (`checkpoint`), and a restarted
   ServerApp continues after the last checkpointed round.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from edgetune.config import RunConfig
from edgetune.errors import EdgeTuneError
from edgetune.protocol import AdapterSpec, ProtocolError, encode_payload, initial_tensors
from edgetune.server.validation import ApiError, validate_update
from edgetune.sim.flower import convert as cv
from edgetune.sim.flower.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from edgetune.strategies import GLOBAL, family_model, make_strategy
from edgetune.strategies.aggregation import ClientUpdate

log = logging.getLogger("edgetune.flower")

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


@dataclass(frozen=True)
class Node:
    """A discovered node: Flower's id, our client name, its family, spec and tier."""

    node_id: int
    name: str
    spec: AdapterSpec
    tier: str

    @property
    def family(self) -> str:
        return self.spec.family


class EdgeTuneStrategy(Strategy):
    """Our registry strategy ``config.strategy`` as a Flower Strategy (see the module doc)."""

    def __init__(
        self,
        config: RunConfig,
        checkpoint_dir: Path | None = None,
        *,
        poll_s: float = 0.2,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.on_round = on_round
        self.expected_nodes = config.num_clients or 1
        self.inner = make_strategy(config)
        self.checkpoint_dir = checkpoint_dir
        self.poll_s = poll_s
        self.nodes: dict[int, Node] = {}
        self.sent: dict[str, int] = {}  # message id -> node id of this round's instructions
        self.results: dict[str, dict[str, float]] = {}  # client -> final result
        found = load_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
        if found is not None and found.strategy != config.strategy:
            raise EdgeTuneError(
                f"{checkpoint_dir} holds a {found.strategy!r} run, not {config.strategy!r}"
            )
        self.state = found or Checkpoint(strategy=config.strategy)
        if found is not None:
            log.info("resuming from %s after round %d", checkpoint_dir, found.round)

    # -- the Flower verbs ----------------------------------------------------------------
    def summary(self) -> None:
        log.info(
            "EdgeTune strategy %s: %d nodes in families %s, after round %d",
            self.config.strategy, len(self.nodes),
            sorted({n.family for n in self.nodes.values()}), self.state.round,
        )  # fmt: skip

    def arrays(self) -> ArrayRecord:
        """The whole model state as one ArrayRecord (keys ``<model>::<tensor>``)."""
        return ArrayRecord(cv.flatten_state(self.state.models))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per node: the global branch, its family's view and its round config."""
        return [self._instruction(server_round, node, config) for node in self.nodes.values()]

    def _instruction(self, rnd: int, node: Node, extra: ConfigRecord) -> Message:
        glob = self.state.models.get(GLOBAL, {}) if self.inner.uses_global else {}
        fam = self.inner.download_view(self.state.models[family_model(node.family)], node.spec)
        glob_record, glob_dtypes = cv.to_record(glob)
        fam_record, fam_dtypes = cv.to_record(fam)
        conf = ConfigRecord({
            **dict(extra),
            "round": rnd,
            "family": node.family,
            "family_version": self.state.versions.get(family_model(node.family), 0),
            "accepted_round": self.state.accepted.get(node.name, 0),
            "dtypes": f'{{"global": {glob_dtypes}, "family": {fam_dtypes}}}',
        })  # fmt: skip
        content = RecordDict(
            {cv.ARRAYS_GLOBAL: glob_record, cv.ARRAYS_FAMILY: fam_record, cv.CONFIG: conf}
        )
        return Message(content, dst_node_id=node.node_id, message_type=cv.TRAIN, group_id=str(rnd))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, log and skip failures, aggregate the rest with the registry strategy."""
        started = time.perf_counter()
        replies = list(replies)
        updates, failed = self._decode_replies(server_round, replies)
        answered = {self.sent.get(r.metadata.reply_to_message_id) for r in replies}
        failed += [(n.name, "no reply before the round closed (quorum or deadline)")
                   for nid, n in self.nodes.items() if nid not in answered]  # fmt: skip
        for name, reason in failed:
            log.warning("round %d: skipping %s: %s", server_round, name, reason)
        entry = self._aggregate(server_round, updates)
        entry["failed"] = [{"client": c, "reason": r} for c, r in failed]
        entry["seconds"] = round(time.perf_counter() - started, 4)
        self.state.history.append(entry)
        self.state.round = server_round
        if self.checkpoint_dir is not None:
            save_checkpoint(self.checkpoint_dir, self.state)
        if self.on_round is not None:
            self.on_round(entry)
        metrics = {"aggregated": entry["aggregated"], "failed": len(failed) + len(entry["skipped"])}
        return (self.arrays() if entry["aggregated"] else None), MetricRecord(metrics)

    def _aggregate(self, rnd: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        entry: dict[str, Any] = {"round": rnd, "aggregated": 0, "skipped": []}
        if len(updates) < self.config.server.min_clients_at_deadline:
            log.warning("round %d: %d valid replies < server.min_clients_at_deadline; abandoned",
                        rnd, len(updates))  # fmt: skip
            return {**entry, "abandoned": True}
        specs = {n.name: n.spec for n in self.nodes.values()}
        result = self.inner.aggregate_round(rnd, self.state.models, updates, specs)
        for name, tensors in result.models.items():
            self.state.models[name] = tensors
            self.state.versions[name] = rnd
        skipped = {c for c, _ in result.skipped}
        if result.models:
            for u in updates:
                if u.client_id not in skipped:
                    self.state.accepted[u.client_id] = rnd
        entry["skipped"] = [{"client": c, "reason": r} for c, r in result.skipped]
        entry["aggregated"] = int(result.summary.get("aggregated", 0)) if result.models else 0
        return entry

    def _decode_replies(
        self, rnd: int, replies: list[Message]
    ) -> tuple[list[ClientUpdate], list[tuple[str, str]]]:
        """Valid updates ordered by content hash (as our server orders them), and failures."""
        decoded, failed = [], []
        for reply in replies:
            node = self.nodes.get(self.sent.get(reply.metadata.reply_to_message_id, -1))
            if node is None:
                continue  # a reply to an instruction of another round
            if reply.has_error():
                failed.append((node.name, f"error reply: {error_reason(reply.error.reason)}"))
                continue
            try:
                decoded.append(self._decode(rnd, node, reply))
            except (ApiError, ProtocolError, ValueError, KeyError, TypeError) as err:
                failed.append((node.name, f"invalid reply: {getattr(err, 'message', err)}"))
        decoded.sort(key=lambda pair: pair[0])
        return [u for _, u in decoded], failed

    def _decode(self, rnd: int, node: Node, reply: Message) -> tuple[str, ClientUpdate]:
        meta = cv.record_meta(reply.content[cv.META])
        tensors = cv.from_record(reply.content[cv.ARRAYS_UPDATE], meta.pop("flower.dtypes", "{}"))
        body = encode_payload(tensors, meta)
        server = self.config.server
        valid = validate_update(
            body, node.spec, rnd, max_samples=server.max_num_samples,
            allowed_dtypes=server.allowed_dtypes, max_abs_value=server.max_abs_value,
        )  # fmt: skip
        floats = {k: v.to(torch.float32) for k, v in valid.tensors.items()}
        update = ClientUpdate(node.name, node.family, valid.meta.num_samples, floats, node.tier,
                              valid.meta.metrics)  # fmt: skip
        return hashlib.sha256(body).hexdigest(), update

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: nodes report personal accuracy with every train reply and
        global models are evaluated server side (``evaluate_fn``)."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    # -- the run -------------------------------------------------------------------------
    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Discover, then run rounds ``state.round + 1 .. num_rounds`` (default: the config's)
        with a deadline of ``timeout`` (default ``server.round_timeout_s``) each, then ask
        every node for its final result. ``initial_arrays`` is ignored: round 0 is made from
        the pinned specs (or read from the checkpoint)."""
        rounds = num_rounds or self.config.rounds
        deadline = timeout or self.config.server.round_timeout_s
        result = Result()
        self.discover(grid, deadline)
        self.summary()
        if self.state.round == 0 and evaluate_fn is not None:
            result.evaluate_metrics_serverapp[0] = evaluate_fn(0, self.arrays()) or MetricRecord()
        for rnd in range(self.state.round + 1, rounds + 1):
            instructions = self.configure_train(
                rnd, self.arrays(), train_config or ConfigRecord(), grid
            )
            replies = self.exchange(grid, instructions, deadline, self._quorum())
            arrays, metrics = self.aggregate_train(rnd, replies)
            result.arrays = arrays or result.arrays
            result.train_metrics_clientapp[rnd] = metrics or MetricRecord()
            if evaluate_fn is not None:
                result.evaluate_metrics_serverapp[rnd] = (
                    evaluate_fn(rnd, self.arrays()) or MetricRecord()
                )
        self.finish(grid, deadline)
        return result

    def _quorum(self) -> int:
        return min(self.config.quorum, len(self.nodes)) if self.config.groups else len(self.nodes)

    def exchange(
        self, grid: Grid, messages: Iterable[Message], timeout: float, quorum: int | None = None
    ) -> list[Message]:
        """Push ``messages``; pull replies until all answered, ``quorum`` replies without an
        error arrived, or ``timeout`` seconds passed. Later replies are dropped."""
        messages = list(messages)
        ids = list(grid.push_messages(messages))
        self.sent = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages)}
        waiting, replies = set(ids), []
        end = time.monotonic() + timeout
        while waiting and time.monotonic() < end:
            got = list(grid.pull_messages(waiting))
            replies += got
            waiting -= {r.metadata.reply_to_message_id for r in got}
            if quorum is not None and sum(not r.has_error() for r in replies) >= quorum:
                break
            if waiting:
                time.sleep(self.poll_s)
        return replies

    # -- discovery and the end of the run ------------------------------------------------
    def discover(self, grid: Grid, timeout: float) -> None:
        """The query round: wait for the nodes, ask each for its family and spec, pin specs."""
        ids = wait_for_nodes(grid, self.expected_nodes, timeout, self.poll_s)
        asks = [Message(RecordDict({}), dst_node_id=nid, message_type=cv.DESCRIBE,
                        group_id="describe") for nid in ids]  # fmt: skip
        candidates: list[Node] = []
        for reply in self.exchange(grid, asks, timeout):
            node_id = self.sent[reply.metadata.reply_to_message_id]
            if reply.has_error():
                log.warning(
                    "node %d could not describe itself: %s", node_id, reply.error.reason[:300]
                )
                continue
            info = reply.content[cv.INFO]
            spec = AdapterSpec.from_json(str(info["spec"]))
            candidates.append(Node(node_id, str(info["client"]), spec, str(info["tier"])))
        self._pin(candidates)
        self.nodes = {n.node_id: n for n in candidates if self._admit(n)}
        if not self.nodes:
            raise EdgeTuneError("no node could join the run (see the log for why)")
        self._initial_models()

    def _pin(self, nodes: list[Node]) -> None:
        """Each new family's spec: its largest rank (a checkpoint's pins are kept)."""
        for node in sorted(nodes, key=lambda n: -n.spec.rank):
            self.state.specs.setdefault(node.family, node.spec.to_json())

    def _admit(self, node: Node) -> bool:
        pinned = AdapterSpec.from_json(self.state.specs[node.family])
        reason = self.inner.check_spec(node.spec, pinned)
        if reason is None and self.inner.uses_global:
            reason = self._global_mismatch(node.spec)
        if reason is not None:
            log.warning("node %s (%s) refused: %s", node.name, node.family, reason)
        return reason is None

    def _global_mismatch(self, spec: AdapterSpec) -> str | None:
        mine = {n: tuple(t.shape) for n, t in spec.global_tensors().items()}
        first = AdapterSpec.from_json(next(iter(self.state.specs.values())))
        pinned = {n: tuple(t.shape) for n, t in first.global_tensors().items()}
        return None if mine == pinned else f"global branch {mine} != pinned {pinned}"

    def _initial_models(self) -> None:
        """Round-0 tensors of every family without a model yet, as our server makes them."""
        for family, text in sorted(self.state.specs.items()):
            if family_model(family) in self.state.models:
                continue
            glob, fam = initial_tensors(AdapterSpec.from_json(text), self.config.seed)
            if self.inner.uses_global:
                self.state.models.setdefault(GLOBAL, glob)
                self.state.versions.setdefault(GLOBAL, 0)
            self.state.models[family_model(family)] = fam
            self.state.versions[family_model(family)] = 0

    def finish(self, grid: Grid, timeout: float) -> dict[str, dict[str, float]]:
        """Ask every node for its final result (personal test accuracy, bytes)."""
        asks = [Message(RecordDict({}), dst_node_id=nid, message_type=cv.FINISH,
                        group_id="finish") for nid in self.nodes]  # fmt: skip
        for reply in self.exchange(grid, asks, timeout):
            node = self.nodes[self.sent[reply.metadata.reply_to_message_id]]
            if reply.has_error():
                log.warning("%s: no final result: %s", node.name, error_reason(reply.error.reason))
                continue
            self.results[node.name] = dict(reply.content[cv.RESULT])
        return self.results


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^\w*(?:Error|Exception)\b.*?: .+$", re.MULTILINE)


def error_reason(text: str, limit: int = 300) -> str:
    """The line of an error reply that says what went wrong: Flower's Ray backend sends a
    whole traceback; its last ``SomeError: message`` line is kept (colour codes removed)."""
    plain = _ANSI.sub("", text or "")
    marker = "Exception ClientAppException occurred. Message:"
    if marker in plain:
        return plain.rsplit(marker, 1)[1].strip().splitlines()[0][:limit]
    raised = _RAISED.findall(plain)
    return (raised[-1] if raised else plain.strip().splitlines()[-1] if plain.strip() else "?")[
        :limit
    ]


def wait_for_nodes(grid: Grid, expected: int, timeout: float, poll_s: float) -> list[int]:
    """The online node ids once ``expected`` are connected, or what is there at ``timeout``
    (never forever, unlike Flower's ``sample_nodes``)."""
    end = time.monotonic() + timeout
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= expected or time.monotonic() >= end:
            if len(ids) < expected:
                log.warning("%d of %d nodes connected within %.0f s; going on", len(ids),
                            expected, timeout)  # fmt: skip
            return ids
        time.sleep(poll_s)
