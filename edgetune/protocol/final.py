"""The final-model folder every run writes per family: ``<out or state>/final/<family>/``.

`simulate` (from its evaluator's adapter) and the server (from its stored global and family
models) write the same two files, each atomically (temp file, fsync, rename):

- ``adapter.safetensors``: the family bundle, the global branch and the head under their wire
  names, with the metadata `edgetune export --adapter` reads (family, fingerprint, adapter
  config, and where known the backbone and the class names);
- ``model.json``: a card naming the family, backbone, version (round), classes and groups.

Both writers share `write_final`, so the format has one definition.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetune.protocol.names import META_BACKBONE, META_CLASSES, META_FAMILY, META_GROUPS

if TYPE_CHECKING:
    import torch

FINAL_DIR = "final"
FINAL_ADAPTER = "adapter.safetensors"
FINAL_CARD = "model.json"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def final_card(metadata: Mapping[str, str], version: int, adapter: Path) -> dict[str, Any]:
    """The ``model.json`` card of a final adapter file with ``metadata``."""
    classes = metadata.get(META_CLASSES)
    backbone = metadata.get(META_BACKBONE)
    export = f"edgetune export --adapter {adapter} --out <folder>"
    return {
        "family": metadata.get(META_FAMILY),
        "backbone": backbone,
        "version": version,
        "classes": json.loads(classes) if classes else None,
        "groups": [g for g in metadata.get(META_GROUPS, "").split(",") if g],
        "export": export if backbone else export + " --backbone <zoo name or folder>",
    }


def write_final(
    folder: Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    version: int,
) -> Path:
    """Write ``folder/adapter.safetensors`` and ``folder/model.json``; returns the adapter."""
    from edgetune.protocol.codec import encode_payload

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FINAL_ADAPTER
    atomic_write(path, encode_payload(tensors, metadata))
    card = final_card(metadata, version, path)
    atomic_write(folder / FINAL_CARD, json.dumps(card, indent=1).encode())
    return path
