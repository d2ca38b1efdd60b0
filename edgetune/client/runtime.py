"""The client runtime: register, then per round fetch -> train -> evaluate -> upload -> persist.

One `ClientRuntime` owns a frozen (optionally quantized) backbone with a FedAdapter or LoRA,
its local data shard, and a state directory. Everything needed to continue after a crash lives
in that directory, written atomically: `client.json` (id, token, last finished round) and
`adapter.safetensors` (every adapter tensor, the private branch included). A restarted client
loads both and carries on with the server's current round.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetune.adapters.fedadapter import AdapterConfig, apply_fedadapter
from edgetune.adapters.lora import LoraConfig, apply_lora
from edgetune.client.trainer import (
    EncodedSplit,
    TrainConfig,
    evaluate,
    measure_step_flops,
    train_local,
)
from edgetune.client.transport import ServerClient, ServerError
from edgetune.data.datasets import Dataset, Split, load_dataset
from edgetune.data.partition import dirichlet_partition
from edgetune.errors import ConfigError
from edgetune.models.heads import build_task_model
from edgetune.models.zoo import load_backbone
from edgetune.protocol import (
    KIND_FEDADAPTER,
    KIND_LORA,
    META_ROUND,
    AdapterSpec,
    ErrorFeedback,
    UpdateMeta,
    bundles_to_send,
    compress_update,
    first_block_of,
    initial_tensors,
    select_bundles,
)

log = logging.getLogger(__name__)
KINDS = ("fedadapter", "fedavg-lora", "hetlora", "flexlora", "flora", "local")


@dataclass(frozen=True)
class ShardSpec:
    """Which part of a dataset this client holds: the whole train split, or one Dirichlet shard."""

    dataset: str
    categories: tuple[str, ...] = ()
    max_per_class: int = 0
    index: int = 0
    num_clients: int = 1
    alpha: float = 0.5
    seed: int = 0
    test_fraction: float = 0.2
    local_holdout: float = 0.2


@dataclass(frozen=True)
class ClientSettings:
    server: str
    join_token: str
    backbone: str
    state_dir: Path
    shard: ShardSpec
    kind: str = "fedadapter"
    quant: str = "none"
    tier: str = "none"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    max_rounds: int = 0  # 0: until the server finishes
    poll_s: float = 0.5
    family_every: int = 1  # FedAdapter: family bundle every P rounds, global branch every round
    compression: str = "none"  # "int8": int8 + per-tensor scale, with error feedback
    eval_test_at_end: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind={self.kind!r}: allowed values are {KINDS}")


def load_shard(shard: ShardSpec) -> tuple[Dataset, Split, Split]:
    """(dataset, local train part, local held-out part) for this client, deterministically."""
    options: dict[str, Any] = {"seed": shard.seed, "test_fraction": shard.test_fraction}
    if shard.dataset == "fortunes":
        options["categories"] = shard.categories or None
        options["max_per_class"] = shard.max_per_class or None
        options = {k: v for k, v in options.items() if v is not None}
    dataset = load_dataset(shard.dataset, **options)
    parts = dirichlet_partition(
        dataset.train.labels, shard.num_clients, shard.alpha, seed=shard.seed
    )
    mine = np.random.default_rng(shard.seed + 7919 * (shard.index + 1)).permutation(
        parts[shard.index]
    )
    n_hold = round(len(mine) * shard.local_holdout) if len(mine) > 4 else 0
    return (
        dataset,
        dataset.train.subset(np.sort(mine[n_hold:])),
        dataset.train.subset(np.sort(mine[:n_hold])),
    )


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class ClientRuntime:
    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.backbone = load_backbone(settings.backbone, **_quant_options(settings.quant))
        # After a probe fallback (e.g. nf4 -> int8) the tier reports the format actually in use.
        self.tier = settings.tier
        if self.backbone.quant != settings.quant:
            self.tier = f"{self.backbone.quant}-from-{settings.quant}"
        self.dataset, train_split, holdout = load_shard(settings.shard)
        n_classes = len(self.dataset.classes)
        self.task = build_task_model(self.backbone, "classify", n_classes=n_classes)
        self.handle = self._inject(settings)
        self.spec = self._adapter_spec(n_classes)
        max_len = settings.train.max_length
        self.train_data = EncodedSplit(self.backbone, train_split, max_len)
        self._first_batch_split = train_split.subset(
            np.arange(min(len(train_split), settings.train.batch_size))
        )
        self.holdout = EncodedSplit(self.backbone, holdout, max_len)
        self.server = ServerClient(settings.server)
        self.train_flops_per_sample = self._train_flops_per_sample(settings, n_classes)
        self.error_feedback = ErrorFeedback()  # int8 residuals, persisted with the state
        self.state = self._load_state()
        self._merged_version = self.state.get("merged_version", -1)

    # -- set-up ------------------------------------------------------------------------
    def _inject(self, settings: ClientSettings, backbone=None, task=None):
        backbone, task = backbone or self.backbone, task or self.task
        if settings.kind in ("fedadapter", "local"):
            return apply_fedadapter(backbone.model, backbone.spec, settings.adapter, head=task.head)
        return apply_lora(backbone.model, backbone.spec, settings.lora, head=task.head)

    def _train_flops_per_sample(self, settings: ClientSettings, n_classes: int) -> float:
        """FLOPs of one training step per sample, counted once on the first batch.

        bitsandbytes' quantized matmuls have no FLOP formula (they would count as zero), so a
        quantized client counts on an fp32 copy of its backbone: the arithmetic is the same.
        """
        if not len(self.train_data):
            return 0.0
        task, handle, data = self.task, self.handle, self.train_data
        if self.backbone.quant != "none":
            fp32 = load_backbone(settings.backbone)
            task = build_task_model(fp32, "classify", n_classes=n_classes)
            handle = self._inject(settings, fp32, task)
            data = EncodedSplit(fp32, self._first_batch_split, settings.train.max_length)
        flops, n = measure_step_flops(
            task, handle.trainable_parameters(), data, settings.train.batch_size
        )
        return flops / n

    def _adapter_spec(self, n_classes: int) -> AdapterSpec:
        spec, s = self.backbone.spec, self.settings
        common = {
            "family": spec.family,
            "fingerprint": spec.fingerprint,
            "d_model": spec.hidden_size,
            "n_layers": spec.num_layers,
            "n_classes": n_classes,
        }
        if s.kind in ("fedadapter", "local"):
            first = first_block_of(s.adapter.blocks)
            if first is None or tuple(s.adapter.branches) != ("global", "family", "private"):
                raise ConfigError(
                    "the wire protocol carries adapters on blocks 'all' or 'from:N' with all "
                    "three branches; set adapter.blocks accordingly and the default branches"
                )
            return AdapterSpec(
                kind=KIND_FEDADAPTER,
                rank=s.adapter.rank,
                n_anchors=s.adapter.n_anchors,
                gate=s.adapter.gate,
                first_block=first,
                **common,
            )
        return AdapterSpec(
            kind=KIND_LORA, rank=s.lora.rank, lora_modules=self.handle.module_shapes(), **common
        )

    @property
    def state_file(self) -> Path:
        return self.settings.state_dir / "client.json"

    @property
    def adapter_file(self) -> Path:
        return self.settings.state_dir / "adapter.safetensors"

    def _load_state(self) -> dict[str, Any]:
        if not self.state_file.is_file():
            return {"last_round": 0}
        state = json.loads(self.state_file.read_text())
        if self.adapter_file.is_file():
            self.handle.load(self.adapter_file)
            log.info(
                "resumed from %s after round %s", self.settings.state_dir, state.get("last_round")
            )
        feedback_file = self.settings.state_dir / "error_feedback.safetensors"
        if feedback_file.is_file():
            from safetensors.torch import load_file

            self.error_feedback.load_state_dict(load_file(str(feedback_file)))
        merged_file = self.settings.state_dir / "flora_merged.safetensors"
        if self.settings.kind == "flora" and merged_file.is_file():
            from safetensors.torch import load_file

            for path, delta in load_file(str(merged_file)).items():
                self.handle.lora_modules[path].merged = delta
        if state.get("token"):
            self.server.token = state["token"]
        return state

    def _save_state(self) -> None:
        from safetensors.torch import save

        tensors = {n: t.detach().contiguous() for n, t in self.handle.named_tensors().items()}
        _atomic_write(
            self.adapter_file,
            save(
                tensors,
                metadata=self.handle.metadata() | {"edgetune.groups": ",".join(self._groups())},
            ),
        )
        if self.settings.kind == "flora" and self._merged_version >= 0:
            merged = {
                p: m.merged.contiguous()
                for p, m in self.handle.lora_modules.items()
                if m.merged is not None
            }
            _atomic_write(self.settings.state_dir / "flora_merged.safetensors", save(merged))
        if self.error_feedback.residual:
            residual = {n: t.contiguous() for n, t in self.error_feedback.state_dict().items()}
            _atomic_write(self.settings.state_dir / "error_feedback.safetensors", save(residual))
        self.state["merged_version"] = self._merged_version
        _atomic_write(self.state_file, json.dumps(self.state, indent=1).encode())  # last: commits

    def _groups(self) -> list[str]:
        return ["lora", "head"] if self.spec.kind == KIND_LORA else ["global", "family", "private"]

    # -- the round loop ----------------------------------------------------------------
    def register(self) -> None:
        if self.state.get("token"):
            return
        reg = self.server.register(self.settings.join_token, self.spec, self.tier)
        self.state.update(client_id=reg.client_id, token=reg.token, family=reg.family)
        self._save_state()
        log.info("registered as %s (family %s, tier %s)", reg.client_id, reg.family, self.tier)

    def run(self) -> dict[str, Any]:
        """Take part in rounds until the server finishes (or `max_rounds`); returns final metrics."""
        if self.settings.kind == "local":
            return self.run_local()
        self.register()
        while True:
            info = self.server.current_round()
            done = self.settings.max_rounds and self.state["last_round"] >= self.settings.max_rounds
            if info["finished"] or done:
                return self._finish()
            if (
                info["uploaded"]
                or not info["accepting"]
                or info["round"] <= self.state["last_round"]
            ):
                time.sleep(self.settings.poll_s)
                continue
            self.run_round(info)

    def run_round(self, info: dict[str, Any]) -> dict[str, float]:
        round_id = int(info["round"])
        up0, down0 = self.server.bytes_up, self.server.bytes_down
        sent_global = self.download_models(info)
        metrics = self._train_and_evaluate(round_id)
        s = self.settings
        bundles = bundles_to_send(self.spec, round_id, s.family_every, s.max_rounds)
        tensors = select_bundles(self._update_tensors(sent_global), self.spec, bundles)
        tensors, compression = compress_update(tensors, self.error_feedback, s.compression)
        meta = UpdateMeta(
            family=self.spec.family,
            round_id=round_id,
            spec_hash=self.spec.spec_hash,
            fingerprint=self.spec.fingerprint,
            num_samples=max(1, metrics["samples"]),
            metrics=metrics,
            compression=compression,
            bundles=bundles,
        )
        try:
            self.server.upload(info["upload"], tensors, meta)
        except ServerError as err:
            if err.status != 409:
                raise
            log.warning(
                "round %d closed before our upload landed (%s); moving on", round_id, err.detail
            )
        self.state["last_round"] = round_id
        self._save_state()
        self._log_round(
            round_id, metrics, self.server.bytes_up - up0, self.server.bytes_down - down0
        )
        return metrics

    def _log_round(self, round_id: int, metrics: dict[str, float], up: int, down: int) -> None:
        """One JSON line per finished round in the state dir (the simulation reads these)."""
        line = {
            "round": round_id,
            "family": self.spec.family,
            "tier": self.tier,
            "bytes_up": up,
            "bytes_down": down,
            **metrics,
        }
        with (self.settings.state_dir / "rounds.jsonl").open("a") as handle:
            handle.write(json.dumps(line) + "\n")

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
            if self.settings.kind == "flora":
                # The version actually served: `?version=N` answers the newest one <= N, which
                # must not be folded twice when a round had no update of this family.
                self._fold_flora(family, int(meta.get(META_ROUND, "0")))
            else:
                self.load_family(family)
            if version is None:
                self.state["family_version_loaded"] = info.get("family_version")
        # else: an off-round of the family bundle; keep training our own family weights
        if "global" not in downloads:
            return {}
        glob, _ = self.server.download(downloads["global"] + query)
        self.handle.load_group("global", glob)
        return glob

    def _family_unchanged(self, info: dict[str, Any]) -> bool:
        """With a family period > 1: the server's family model is the one we loaded last."""
        loaded = self.state.get("family_version_loaded")
        return (
            self.settings.family_every > 1
            and loaded is not None
            and (info.get("family_version") == loaded)
        )

    def _lora_wire(self, tensors: dict[str, torch.Tensor], power: float) -> dict[str, torch.Tensor]:
        """LoRA B factors travel as `B * alpha / rank` (power 1), so the server aggregates true
        updates across clients of different ranks; power -1 converts back to this client's B."""
        out = dict(tensors)
        for path, module in self.handle.lora_modules.items():
            name = f"lora.{path}.B"
            if name in out:
                out[name] = out[name] * module.scaling**power
        return out

    def load_family(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.spec.kind == KIND_LORA:
            tensors = self._lora_wire(tensors, -1.0)
        groups = ("lora", "head") if self.spec.kind == KIND_LORA else ("family",)
        for group in groups:
            self.handle.load_group(
                group, {n: t for n, t in tensors.items() if n in self.handle.named_tensors(group)}
            )

    def _fold_flora(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        """FLoRA: add the stacked product B @ A into each layer once, then restart LoRA."""
        self.handle.load_group(
            "head", {n: t for n, t in tensors.items() if n.startswith("family.head.")}
        )
        if version <= self._merged_version:
            return
        for path, module in self.handle.lora_modules.items():
            module.merge(tensors[f"lora.{path}.B"], tensors[f"lora.{path}.A"])
            module.reset(seed=int(self.spec.fingerprint[:8], 16) + version)
        self._merged_version = version

    def _update_tensors(self, sent_global: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.spec.kind == KIND_LORA:
            return {
                **self._lora_wire(self.handle.state_dict_for("lora"), 1.0),
                **self.handle.state_dict_for("head"),
            }
        trained = self.handle.state_dict_for("global")
        deltas = {
            n: trained[n] - sent_global[n] for n in trained
        }  # the global branch travels as deltas
        return {**deltas, **self.handle.state_dict_for("family")}

    def _train_and_evaluate(self, round_id: int) -> dict[str, float]:
        before = evaluate(self.task, self.holdout) if len(self.holdout) else None
        result = train_local(
            self.task,
            self.handle.trainable_parameters(),
            self.train_data,
            self.settings.train,
            round_id=round_id,
            desc=f"round {round_id}",
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

    def _finish(self) -> dict[str, Any]:
        final: dict[str, Any] = {
            "rounds": self.state["last_round"],
            "bytes_up": self.server.bytes_up,
            "bytes_down": self.server.bytes_down,
        }
        if self.settings.eval_test_at_end:
            test = EncodedSplit(self.backbone, self.dataset.test, self.settings.train.max_length)
            final["personal_test_acc"] = evaluate(self.task, test).accuracy
        self.server.close()
        return final

    # -- local-only baseline -------------------------------------------------------------
    def run_local(self) -> dict[str, Any]:
        """No server: start from the same initial tensors a server would send, train R rounds."""
        glob, fam = initial_tensors(self.spec, seed=self.settings.shard.seed)
        if self.state["last_round"] == 0:
            self.handle.load_group("global", glob)
            self.load_family(fam)
        history = []
        while self.state["last_round"] < self.settings.max_rounds:
            round_id = self.state["last_round"] + 1
            metrics = self._train_and_evaluate(round_id)
            history.append({"round": round_id, **metrics})
            self.state["last_round"] = round_id
            self._save_state()
            self._log_round(round_id, metrics, 0, 0)
        return {**self._finish(), "history": history}


def _quant_options(quant: str) -> dict[str, Any]:
    return {} if quant == "none" else {"quant": quant}
