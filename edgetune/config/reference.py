"""The config reference: every key with its type, default and meaning (the README's table)."""

from __future__ import annotations

import dataclasses

from edgetune.config.run import SECTIONS, RunConfig, field_default
from edgetune.config.sections import ClientGroup
from edgetune.strategies.registry import NAMES

DOCS = {
    "rounds": "federated rounds; the server stops after the last",
    "strategy": f"one of {', '.join(NAMES)}",
    "seed": "seeds the split, partition, server init and training",
    "task": "classify, or lm: causal-LM tuning of decoders, scored by held-out perplexity",
    "data.dataset": "fortunes, mnist5k, digits or a .csv/.jsonl path",
    "data.categories": "fortunes categories (classes)",
    "data.max_per_class": "cap per class, 0 = all",
    "data.alpha": "Dirichlet label-skew concentration",
    "data.test_fraction": "shared test split",
    "data.local_holdout": "share of each client's data for personal evaluation",
    "data.eval_samples": "test samples for the global evaluation, 0 = all",
    "adapter.rank": "r, the common rank of every branch",
    "adapter.branches": "subset of global/family/private",
    "adapter.n_anchors": "K global anchor slots",
    "adapter.gate": "layer or token mixing weights",
    "adapter.scale": "s, the output scale",
    "adapter.blocks": "'all', 'from:N' or a list of blocks",
    "adapter.dropout": "dropout on the adapter input",
    "lora.rank": "LoRA rank (baselines)",
    "lora.alpha": "LoRA alpha (scaling alpha/rank)",
    "lora.targets": "module names to adapt, [] = per architecture (q_proj/v_proj, query/value)",
    "lora.dropout": "LoRA dropout",
    "train.epochs": "local epochs per round",
    "train.batch_size": "local batch size",
    "train.lr": "AdamW learning rate",
    "train.weight_decay": "AdamW weight decay",
    "train.max_length": "token truncation",
    "train.time_budget_s": "stop local training after this many seconds, 0 = none",
    "train.seed": "shuffling seed (simulate: seed * 1000 + client index)",
    "train.loss": "ce, or balanced: logits shifted by the client's label prior",
    "train.head_lr": "learning rate of an sgd head, 0 = train.lr",
    "train.head": "stats (server fits heads from class statistics; round 1 gathers them) or sgd",
    "train.freeze_head": "stats heads: frozen between statistics rounds (false: trained too)",
    "comm.family_every": "FedAdapter: family bundle every P rounds, global every round",
    "comm.compression": "none or int8 (per-tensor scale + error feedback)",
    "server.host": "bind address",
    "server.port": "port (simulate picks a free one)",
    "server.min_clients": "quorum, 0 = every client of the [[group]] tables",
    "server.min_clients_at_deadline": "uploads that still close a round at its deadline",
    "server.round_timeout_s": "deadline of a round",
    "server.on_deadline": "extend or abandon a round short of uploads at its deadline",
    "server.max_extensions": "deadline extensions before a short round is abandoned",
    "server.beta": "family balance of the merge",
    "server.eta": "server step on the global branch",
    "server.project_conflicts": "remove conflicting global deltas",
    "server.max_upload_bytes": "largest accepted upload",
    "server.max_num_samples": "largest sample count an update may claim",
    "server.max_abs_value": "largest magnitude of any value in an update (bounds one client)",
    "server.max_families": "model families the server pins at most",
    "server.max_clients": "registered clients at most",
    "server.registrations_per_minute": "registration attempts per minute, all clients together",
    "server.body_timeout_s": "seconds an upload's body may take to arrive",
    "server.header_timeout_s": "seconds a request's head may take to arrive",
    "server.max_concurrent_uploads": "uploads read at once; more are answered 429",
    "server.token_ttl_s": "client tokens expire this long after registration, 0 = never",
    "server.allowed_dtypes": "float dtypes an update may use",
    "server.tick_s": "scheduler period (quorum and deadline checks)",
    "server.sqlite_synchronous": "SQLite synchronous mode (NORMAL, FULL, EXTRA)",
    "server.fsync_blobs": "fsync every stored blob",
    "server.torch_threads": "torch threads for aggregation, 0 = torch's default",
    "server.log_level": "DEBUG, INFO, WARNING or ERROR",
    "client.url": "server URL (edgetune client)",
    "client.ca_cert": "CA certificate (PEM) to trust for an https server, '' = the system's",
    "client.state_dir": "where a client keeps its state and adapter",
    "client.backbone": "zoo name or model folder",
    "client.quant": "none, int8, nf4 or fp4",
    "client.rank": "the client's own rank, 0 = the run's",
    "client.shard": "which Dirichlet shard of the training split the client holds",
    "client.shards": "shards the split is cut into, 1 = the whole split",
    "client.max_rounds": "stop after this many rounds, 0 = when the server finishes",
    "client.poll_s": "seconds between polls of the current round",
    "client.eval_test_at_end": "evaluate on the test split when done",
    "client.bridges": "other backbones this device runs (frozen features paired with ours)",
    "client.stats_source": "the device's first client: also reports frozen statistics",
    "[[group]].backbone": "zoo name or model folder",
    "[[group]].quant": "none, int8, nf4 or fp4",
    "[[group]].count": "clients in this tier",
    "[[group]].rank": "per-tier rank, 0 = the run's",
    "[[group]].also": "backbones these devices also train on their data",
}


def config_reference() -> str:
    """The TOML reference of every key with its type and default, as the README shows it."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(RunConfig):
        if f.name not in SECTIONS and f.name != "groups":
            rows.append(_row(f.name, f))
    for section, cls in SECTIONS.items():
        rows += [_row(f"{section}.{f.name}", f) for f in dataclasses.fields(cls)]
    rows += [_row(f"[[group]].{f.name}", f) for f in dataclasses.fields(ClientGroup)]
    return "\n".join(rows)


def _row(key: str, f: dataclasses.Field) -> str:
    default = field_default(f)
    shown = (
        "required"
        if default is None
        else repr(list(default) if isinstance(default, tuple) else default)
    )
    kind = str(f.type).replace("|", "or")
    return f"| `{key}` | {kind} | `{shown}` | {DOCS[key]} |"
