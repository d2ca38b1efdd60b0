"""The server writes ``<state>/final/<family>/`` after every round; ``edgetune export`` takes it
without naming the backbone (issue 17, item 1)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from edgetune.adapters.build import inject, wire_spec
from edgetune.cli import main as edgetune_main
from edgetune.config import ClientGroup, RunConfig
from edgetune.models.heads import build_task_model
from edgetune.models.zoo import load_backbone
from edgetune.onnx.layout import read_adapter_file
from edgetune.protocol import META_BACKBONE, META_GROUPS

from .conftest import ApiClient, random_update, wait_for_round

BACKBONE = "tiny-bert-d32-l2"


def _real_spec(n_classes: int = 3):  # type: ignore[no-untyped-def]
    """The spec a client of the tiny backbone registers with (as ClientRuntime builds it)."""
    backbone = load_backbone(BACKBONE)
    task = build_task_model(backbone, "classify", n_classes=n_classes)
    run = RunConfig()
    handle = inject("fedadapter", backbone, task.head, run.adapter, run.lora, run.adapter.rank)
    return wire_spec(backbone.spec, handle, n_classes)


def test_each_round_writes_the_final_model_and_export_takes_it(live_server, tmp_path: Path):
    spec = _real_spec()
    srv = live_server(rounds=2, min_clients=1, groups=(ClientGroup(backbone=BACKBONE),))
    client = ApiClient(srv.url, spec)
    folder = tmp_path / "state" / "final" / spec.family
    for round_id in (1, 2):
        client.put(round_id, client.encode(random_update(spec, seed=round_id), round_id, 10))
        if round_id == 1:  # the folder is there after every round, not only at the end
            wait_for_round(client, 2)
            assert json.loads((folder / "model.json").read_text())["version"] == 1
    wait_for_finished(client)
    card = json.loads((folder / "model.json").read_text())
    assert card["family"] == spec.family and card["backbone"] == BACKBONE
    assert card["version"] == 2 and card["groups"] == ["global", "family"]
    tensors, meta = read_adapter_file(folder / "adapter.safetensors")
    assert meta[META_BACKBONE] == BACKBONE and meta[META_GROUPS] == "global,family"
    served = {**client.download("global"), **client.download("family")}
    assert set(tensors) == set(served)
    for name, value in served.items():
        np.testing.assert_array_equal(tensors[name], value.to(torch.float32).numpy())
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*"))
    out = tmp_path / "onnx"
    rc = edgetune_main(
        ["export", "--adapter", str(folder / "adapter.safetensors"), "--out", str(out)]
    )
    assert rc == 0
    manifest = json.loads((out / "edgetune_export.json").read_text())
    assert manifest["backbone"] == BACKBONE and manifest["family"] == spec.family
    client.close()


def wait_for_finished(client: ApiClient, timeout: float = 15.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if client.round()["finished"]:
            return
        time.sleep(0.02)
    raise AssertionError("the run did not finish")
