"""The client runtime: register, then per round fetch -> train -> evaluate -> upload -> persist.

One `ClientRuntime` owns a frozen (optionally quantized) backbone with the adapter its strategy
trains, its data shard and a state directory (`edgetune.client.state`). What a strategy does
differently on the client (deltas or values, LoRA scaling, FLoRA folding) lives in the
strategy's `ClientHooks`; this module only runs the round loop. A restarted client loads its
state and carries on with the server's current round.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from edgetune.adapters import AdapterHandle, inject, wire_spec
from edgetune.client.state import ADAPTER_FILE, FEEDBACK_FILE, STRATEGY_FILE, StateDir
from edgetune.client.stats import StatsReporter
from edgetune.client.trainer import EncodedSplit, evaluate, measure_step_flops, train_local
from edgetune.client.transport import ServerClient, ServerError
from edgetune.config import RunConfig
from edgetune.data.shards import load_shard
from edgetune.errors import ConfigError
from edgetune.models.heads import build_task_model
from edgetune.models.zoo import Backbone, load_backbone
from edgetune.protocol import (
    BUNDLE_STATS,
    GROUP_GLOBAL,
    META_GROUPS,
    META_ROUND,
    QUANT_NONE,
    ClientCard,
    ErrorFeedback,
    ProtocolError,
    UpdateMeta,
    bundles_to_send,
    compress_update,
    initial_tensors,
    select_bundles,
)
from edgetune.strategies import get_strategy, make_client_hooks
from edgetune.strategies.class_stats import ClientStats, heads_from_clients

log = logging.getLogger(__name__)


class ClientRuntime:
    """One client of a run: ``config.client`` says which backbone, shard and server."""

    def __init__(self, config: RunConfig, join_token: str = "", tier: str | None = None) -> None:
        self.config = config
        self.join_token = join_token
        me = config.client
        self.strategy = get_strategy(config.strategy)
        self.hooks = make_client_hooks(config.strategy)
        self.rank = config.client_rank(me.rank)
        self.backbone = load_backbone(me.backbone, **_quant_options(me.quant))
        # After a probe fallback (e.g. nf4 -> int8) the tier reports the format actually in use.
        self.tier = tier or me.tier
        if self.backbone.quant != me.quant:
            self.tier = f"{self.backbone.quant}-from-{me.quant}"
        self.dataset, train_split, holdout = load_shard(
            config.data, config.seed, me.shard, me.shards
        )
        # The lm task trains no head: the decoder's own LM head scores the next token.
        self.n_classes = len(self.dataset.classes) if config.task == "classify" else 0
        self.task = build_task_model(self.backbone, config.task, n_classes=self.n_classes)
        self.handle = self._inject(self.backbone, self.task)
        self.handle.classes = tuple(self.dataset.classes)
        max_len = config.train.max_length
        self.train_data = EncodedSplit(self.backbone, train_split, max_len)
        self.stats = self._stats_reporter(train_split)
        self.spec = wire_spec(self.backbone.spec, self.handle, self.n_classes)
        if self.stats is not None:
            kind = "source" if self.stats.frozen else "own"
            self.spec = dataclasses.replace(self.spec, stats=kind, bridges=self.stats.bridge_dims)
        self._round_stats: dict[str, torch.Tensor] = {}
        self._first_batch = train_split.subset(
            np.arange(min(len(train_split), config.train.batch_size))
        )
        self.holdout = EncodedSplit(self.backbone, holdout, max_len)
        self.server = ServerClient(me.url or "http://127.0.0.1:9", verify=me.ca_cert or True)
        self.train_flops_per_sample = self._train_flops_per_sample()
        self.error_feedback = ErrorFeedback()  # int8 residuals, persisted with the state
        self.files = StateDir(me.state_dir)
        self.state = self._load_state()

    # -- set-up ------------------------------------------------------------------------
    def _inject(self, backbone: Backbone, task: nn.Module) -> AdapterHandle:
        c = self.config
        return inject(self.strategy.adapter, backbone, task.head, c.adapter, c.lora, self.rank)

    def _stats_reporter(self, train_split: Any) -> StatsReporter | None:
        """Class statistics for server-fit heads (``train.head = "stats"``), or None: not for
        the lm task (no head) nor for runs without a server. Built before any server tensor is
        loaded, while the adapter is still the identity (its frozen statistics)."""
        if self.config.train.head != "stats" or not self.n_classes:
            return None
        me, federated = self.config.client, self.hooks.federated
        return StatsReporter(  # without a server: its own statistics, its own head
            self.task,
            self.train_data,
            train_split,
            self.n_classes,
            source=me.stats_source and federated,
            bridges=me.bridges if federated else (),
            max_length=self.config.train.max_length,
        )

    def statistics_round(self, round_id: int) -> bool:
        """Whether this client only gathers statistics in ``round_id``
        (`RunConfig.statistics_round`)."""
        return self.stats is not None and self.config.statistics_round(round_id)

    def _train_flops_per_sample(self) -> float:
        """FLOPs of one training step per sample, counted once on the first batch.

        bitsandbytes' quantized matmuls have no FLOP formula (they would count as zero), so a
        quantized client counts on an fp32 copy of its backbone: the arithmetic is the same.
        """
        if not len(self.train_data):
            return 0.0
        task, handle, data = self.task, self.handle, self.train_data
        if self.backbone.quant != QUANT_NONE:
            fp32 = load_backbone(self.config.client.backbone)
            task = build_task_model(fp32, self.config.task, n_classes=self.n_classes)
            handle = self._inject(fp32, task)
            data = EncodedSplit(fp32, self._first_batch, self.config.train.max_length)
        batch = self.config.train.batch_size
        flops, n = measure_step_flops(task, handle.trainable_parameters(), data, batch)
        return flops / n

    def _load_state(self) -> dict[str, Any]:
        state = self.files.read_state()
        if self.files.path(ADAPTER_FILE).is_file():
            self.handle.load(self.files.path(ADAPTER_FILE))
            log.info("resumed from %s after round %s", self.files.root, state.get("last_round"))
        feedback = self.files.read_tensors(FEEDBACK_FILE)
        if feedback is not None:
            self.error_feedback.load_state_dict(feedback)
        extra = self.files.read_tensors(STRATEGY_FILE)
        if extra is not None:
            self.hooks.load_extra_state(self.handle, extra, int(state.get("strategy_version", -1)))
        if state.get("token"):
            self.server.token = state["token"]
        return state

    def _save_state(self) -> None:
        """Adapter, residuals and strategy state first; ``client.json`` last commits them."""
        groups = self.hooks.saved_groups
        tensors: dict[str, torch.Tensor] = {}
        for group in groups:
            tensors.update(self.handle.state_dict_for(group))
        meta = self.handle.metadata() | {META_GROUPS: ",".join(groups)}
        self.files.write_tensors(ADAPTER_FILE, tensors, meta)
        extra, version = self.hooks.extra_state(self.handle)
        if extra:
            self.files.write_tensors(STRATEGY_FILE, extra)
            self.state["strategy_version"] = version
        if self.error_feedback.residual:
            self.files.write_tensors(FEEDBACK_FILE, self.error_feedback.state_dict())
        self.files.write_state(self.state)

    # -- the round loop ----------------------------------------------------------------
    def card(self) -> ClientCard:
        """What this client tells the server at registration: its family and the class names
        of its head in row order (none for the lm task, which trains no head)."""
        classes = tuple(self.handle.classes) if self.n_classes else ()
        try:
            return ClientCard(self.spec.family, classes)
        except ProtocolError as err:  # the server would refuse it: say so before registering
            raise ConfigError(f"{self.config.data.dataset}: {err.message}") from err

    def register(self) -> None:
        if self.state.get("token"):
            return
        reg = self.server.register(self.join_token, self.spec, self.tier, self.card())
        self.state.update(client_id=reg.client_id, token=reg.token, family=reg.family)
        self._save_state()
        log.info("registered as %s (family %s, tier %s)", reg.client_id, reg.family, self.tier)

    def run(self) -> dict[str, Any]:
        """Take part in rounds until the server finishes (or `max_rounds`); returns final metrics."""
        if not self.hooks.federated:
            return self.run_local()
        self.register()
        max_rounds = self.config.client.max_rounds
        while True:
            info = self.server.current_round()
            if info["finished"] or (max_rounds and self.state["last_round"] >= max_rounds):
                if info["finished"] and not self.state["last_round"]:
                    log.warning(
                        "the server at %s has already finished its rounds; nothing to train",
                        self.config.client.url,
                    )
                return self._finish()
            stale = info["round"] <= self.state["last_round"]
            if info["uploaded"] or not info["accepting"] or stale:
                time.sleep(self.config.client.poll_s)
                continue
            self.run_round(info)

    def run_round(self, info: dict[str, Any]) -> dict[str, float]:
        round_id = int(info["round"])
        up0, down0 = self.server.bytes_up, self.server.bytes_down
        sent_global = self.download_models(info)
        metrics = self._train_and_evaluate(round_id)
        self._upload(info["upload"], round_id, sent_global, metrics)
        self.state["last_round"] = round_id
        self._save_state()
        up, down = self.server.bytes_up - up0, self.server.bytes_down - down0
        self._log_round(round_id, metrics, up, down)
        return metrics

    def encode_update(
        self, round_id: int, sent_global: dict[str, torch.Tensor], metrics: dict[str, float]
    ) -> tuple[dict[str, torch.Tensor], UpdateMeta, ErrorFeedback]:
        """This round's update in wire form: (tensors, header, the int8 residual it leaves).

        One definition for every transport (HTTP here, Flower messages in
        `edgetune.sim.flower.node`), so both engines send the same bytes. The residual is
        returned, not committed: the caller adopts it only once the server has accepted the
        update (a refused or late update must not move the error feedback).
        """
        comm, final = self.config.comm, self.config.rounds
        if self.statistics_round(final):  # the last training round sends a fresh family bundle
            final -= 1
        bundles = bundles_to_send(self.spec, round_id, comm.family_every, final)
        tensors = self.hooks.upload_tensors(self.handle, sent_global)
        tensors = select_bundles(tensors, self.spec, bundles)
        if self.statistics_round(round_id):  # statistics only: nothing was trained
            tensors, bundles = dict(self._round_stats), (BUNDLE_STATS,)
        pending = self.error_feedback.clone()
        tensors, compression = compress_update(tensors, pending, comm.compression)
        meta = UpdateMeta(
            family=self.spec.family,
            round_id=round_id,
            spec_hash=self.spec.spec_hash,
            fingerprint=self.spec.fingerprint,
            num_samples=max(1, int(metrics["samples"])),  # a statistics round: every text once
            dtype=self.spec.dtype,
            metrics=metrics,
            compression=compression,
            bundles=bundles,
        )
        return tensors, meta, pending

    def _upload(
        self, path: str, round_id: int, sent_global: dict[str, torch.Tensor], metrics: dict
    ) -> None:
        """Encode and PUT this round's update; the int8 residual changes only if it lands."""
        tensors, meta, pending = self.encode_update(round_id, sent_global, metrics)
        try:
            self.server.upload(path, tensors, meta)
        except ServerError as err:
            if err.status != 409:
                raise
            log.warning(
                "round %d closed before our upload landed (%s); moving on", round_id, err.detail
            )
            return
        self.error_feedback = pending

    def _log_round(self, round_id: int, metrics: dict[str, float], up: int, down: int) -> None:
        line = {"round": round_id, "family": self.spec.family, "tier": self.tier}
        self.files.log_round({**line, "bytes_up": up, "bytes_down": down, **metrics})

    def download_models(
        self, info: dict[str, Any], version: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Load the server's global and family tensors (the latest, or as of round `version`).

        Returns the global branch as received (the reference its delta is computed against).
        """
        downloads = info["downloads"]
        query = "" if version is None else f"?version={version}"
        if version is not None or not self._family_unchanged(info):
            family, meta = self.server.download(downloads["family"] + query)
            # The version actually served: `?version=N` answers the newest one <= N.
            self.hooks.load_family(self.handle, family, int(meta.get(META_ROUND, "0")))
            if version is None:
                self.state["family_version_loaded"] = info.get("family_version")
        # else: an off-round of the family bundle; keep training our own family weights
        if GROUP_GLOBAL not in downloads:
            return {}
        glob, _ = self.server.download(downloads[GROUP_GLOBAL] + query)
        self.handle.load_group(GROUP_GLOBAL, glob)
        return glob

    def _family_unchanged(self, info: dict[str, Any]) -> bool:
        """With a family period > 1: the server's family model is the one we loaded last."""
        loaded = self.state.get("family_version_loaded")
        every = self.config.comm.family_every
        return every > 1 and loaded is not None and info.get("family_version") == loaded

    def _train_and_evaluate(self, round_id: int) -> dict[str, float]:
        before = evaluate(self.task, self.holdout) if len(self.holdout) else None
        self._round_stats = {}
        if self.statistics_round(round_id):  # measured on the model as received
            self._round_stats = self.stats.tensors(self.task)
            if not self.hooks.federated:
                self._fit_own_head()
            return self._statistics_metrics(before)
        train = self.config.train
        result = train_local(
            self.task, self._param_groups(), self.train_data, train, round_id, f"round {round_id}"
        )
        after = evaluate(self.task, self.holdout) if len(self.holdout) else None
        metrics = {
            "samples": result.samples,
            "steps": result.steps,
            "train_loss": result.mean_loss,
            "train_seconds": result.seconds,
            "stopped_by_budget": float(result.stopped_by_budget),
            "train_gflops_est": self.train_flops_per_sample * result.samples / 1e9,
        }
        if before is not None and after is not None:
            metrics.update(received_local_acc=before.accuracy, personal_acc=after.accuracy)
        log.info("round %d: %s", round_id, {k: round(v, 4) for k, v in metrics.items()})
        return metrics

    @torch.no_grad()
    def _fit_own_head(self) -> None:
        """No server: the head the server would fit from this client's statistics alone."""
        stats = ClientStats.from_wire(self.spec.family, self._round_stats)
        fitted = heads_from_clients([stats]).get(self.spec.family)
        if fitted is not None and self.handle.head is not None:
            self.handle.head.weight.copy_(fitted[0])
            self.handle.head.bias.copy_(fitted[1])

    def _statistics_metrics(self, received: Any) -> dict[str, float]:
        metrics = {"samples": float(len(self.train_data)), "steps": 0.0, "train_gflops_est": 0.0}
        if received is not None:
            metrics.update(received_local_acc=received.accuracy, personal_acc=received.accuracy)
        log.info("statistics round: class statistics of %d texts", len(self.train_data))
        return metrics

    def _param_groups(self) -> list[dict[str, Any]]:
        """The trainable tensors; the head in its own group when ``train.head_lr`` is set, and
        out of training when the server fits it (``train.head = "stats"``, unless
        ``train.freeze_head`` is false)."""
        params = self.handle.trainable_parameters()
        frozen = self.stats is not None and self.config.train.freeze_head
        if frozen and self.handle.head is not None:
            head = {id(p) for p in self.handle.head.parameters()}
            return [{"params": [p for p in params if id(p) not in head]}]
        head_lr = self.config.train.head_lr
        if not head_lr or self.handle.head is None:
            return [{"params": params}]
        head = {id(p) for p in self.handle.head.parameters()}
        return [
            {"params": [p for p in params if id(p) not in head]},
            {"params": [p for p in params if id(p) in head], "lr": head_lr},
        ]

    def _finish(self) -> dict[str, Any]:
        final: dict[str, Any] = {
            "rounds": self.state["last_round"],
            "bytes_up": self.server.bytes_up,
            "bytes_down": self.server.bytes_down,
        }
        if self.config.client.eval_test_at_end:
            test = EncodedSplit(self.backbone, self.dataset.test, self.config.train.max_length)
            final["personal_test_acc"] = evaluate(self.task, test).accuracy
        self.server.close()
        return final

    # -- local-only baseline -------------------------------------------------------------
    def load_initial(self) -> None:
        """The round-0 tensors a server would send (same seed, same family init)."""
        glob, fam = initial_tensors(self.spec, seed=self.config.seed)
        self.handle.load_group(GROUP_GLOBAL, glob)
        self.hooks.load_family(self.handle, fam, 0)

    def run_local(self) -> dict[str, Any]:
        """No server: start from the initial tensors, train ``rounds`` rounds."""
        if self.state["last_round"] == 0:
            self.load_initial()
        history = []
        while self.state["last_round"] < self.config.rounds:
            round_id = self.state["last_round"] + 1
            metrics = self._train_and_evaluate(round_id)
            history.append({"round": round_id, **metrics})
            self.state["last_round"] = round_id
            self._save_state()
            self._log_round(round_id, metrics, 0, 0)
        return {**self._finish(), "history": history}


def _quant_options(quant: str) -> dict[str, Any]:
    return {} if quant == QUANT_NONE else {"quant": quant}
