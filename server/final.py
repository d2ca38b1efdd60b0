"""``<state>/final/<family>/``: the server's latest global model of each family, as files.

Written after every closed round (the last one included) in the format `simulate` writes
(`edgetune.protocol.final`): the family bundle (head included) and the global branch under
their wire names, with the metadata `edgetune export --adapter` needs. The server sees specs,
not models, so the metadata comes from what it holds: family and fingerprint from the pinned
spec, the adapter config from the run config at the spec's rank, anchors, gate and first block,
the backbone from the run's ``[[group]]`` tables where one of them names the family, the class
names from the card the family's clients sent at registration (`edgetune.protocol.card`).

LoRA runs: the stored B factors are in wire form (``B * alpha / rank``); the final adapter holds
them as a LoRA handle of the family's rank holds them (what `simulate` writes), and the same
tensors also land in PEFT's own format under ``final/<family>/peft/``
(`edgetune.protocol.peft`), except for FLoRA, whose clients fold every round's factors into
their weights: the server holds only the last round's factors, not the model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from edgetune.config import RunConfig
from edgetune.config.sections import section_json
from edgetune.protocol import (
    GROUP_FAMILY,
    GROUP_GLOBAL,
    GROUP_LORA,
    KIND_LORA,
    META_ADAPTER_CONFIG,
    META_BACKBONE,
    META_CLASSES,
    META_FAMILY,
    META_FINGERPRINT,
    META_GROUPS,
    AdapterSpec,
    ClientCard,
    decode_payload,
)
from edgetune.protocol.final import FINAL_DIR, write_final
from edgetune.protocol.peft import PEFT_DIR, unscale_wire_lora, write_peft_folder
from edgetune.strategies.base import GLOBAL, family_model
from edgetune.strategies.lora import FLoRAStrategy

from .registry import log
from .storage import Storage


def backbone_of(run: RunConfig, family: str) -> str | None:
    """The ``[[group]]`` backbone whose family is ``family``, judged by name without loading it:
    zoo names are their own family (``minilm-l6``, ``tiny-bert-d64-l2``), a model folder's
    family ends in ``-<folder name>``."""
    for group in run.groups:
        for backbone in group.backbones:
            name = Path(backbone).name
            if backbone == family or (name and family.endswith(f"-{name}")):
                return backbone
    return None


def adapter_config_json(run: RunConfig, spec: AdapterSpec) -> str:
    """The adapter config a client of ``spec`` trains: the run's section at the spec's shape."""
    if spec.kind == KIND_LORA:
        return section_json(dataclasses.replace(run.lora, rank=spec.rank))
    adapter = run.adapter
    blocks = f"from:{spec.first_block}" if spec.first_block else adapter.blocks
    config = dataclasses.replace(
        adapter, rank=spec.rank, n_anchors=spec.n_anchors, gate=spec.gate, blocks=blocks
    )
    return section_json(config)


def final_metadata(
    run: RunConfig, spec: AdapterSpec, groups: list[str], card: ClientCard | None = None
) -> dict[str, str]:
    meta = {
        META_FAMILY: spec.family,
        META_FINGERPRINT: spec.fingerprint,
        META_ADAPTER_CONFIG: adapter_config_json(run, spec),
        META_GROUPS: ",".join(groups),
    }
    backbone = backbone_of(run, spec.family)
    if backbone is not None:
        meta[META_BACKBONE] = backbone
    if card is not None and card.classes:
        meta[META_CLASSES] = json.dumps(list(card.classes))
    return meta


def _family_tensors(storage: Storage, family: str) -> tuple[dict[str, Any], list[str], int]:
    """The latest global and family models: tensors, groups and the newest version."""
    tensors: dict[str, Any] = {}
    groups: list[str] = []
    version = -1
    for name in (GLOBAL, family_model(family)):
        latest = storage.latest_model(name)
        if latest is None:
            continue
        payload = decode_payload(storage.blobs.get(latest[1])).tensors
        tensors.update(payload)
        version = max(version, latest[0])
        if name == GLOBAL:
            groups.append(GROUP_GLOBAL)
        else:
            groups.append(
                GROUP_LORA if any(n.startswith("lora.") for n in payload) else GROUP_FAMILY
            )
    return tensors, groups, version


def write_finals(run: RunConfig, storage: Storage) -> list[Path]:
    """Write ``<state>/final/<family>/`` for every family with a stored model; a family whose
    files cannot be written is logged and skipped (the round it follows stays closed)."""
    written = []
    for family in storage.families():
        try:
            path = write_family_final(run, storage, family)
        except (OSError, ValueError) as exc:
            log.error("final model of family %s not written: %s", family, exc)
            continue
        if path is not None:
            written.append(path)
    return written


def write_family_final(run: RunConfig, storage: Storage, family: str) -> Path | None:
    """``final/<family>/`` (and its ``peft/`` for LoRA) from the stored models and the
    family's card; None while the family has no model yet."""
    spec_json = storage.family_spec(family)
    tensors, groups, version = _family_tensors(storage, family)
    if spec_json is None or version < 0:
        return None
    spec = AdapterSpec.from_json(spec_json)
    card_json = storage.family_card(family)
    card = ClientCard.from_json(card_json) if card_json else None
    meta = final_metadata(run, spec, groups, card)
    folder = storage.state_dir / FINAL_DIR / family
    if spec.kind == KIND_LORA:
        tensors = unscale_wire_lora(tensors, run.lora.alpha)
    if spec.kind == KIND_LORA and run.strategy != FLoRAStrategy.name:
        write_peft_folder(
            folder / PEFT_DIR,
            tensors,
            alpha=run.lora.alpha,
            dropout=run.lora.dropout,
            base=meta.get(META_BACKBONE),
            classes=card.classes if card else (),
        )
    return write_final(folder, tensors, meta, version)  # model.json, written last, dates it
