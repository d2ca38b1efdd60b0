"""The server writes ``<state>/final/<family>/`` after every round; ``edgetune export`` takes it
without naming the backbone or the labels (class names come from the clients' cards), and a
LoRA run's folder also holds a PEFT adapter that peft loads (issue 17, item 1)."""

from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edgetune.adapters.build import inject, wire_spec
from edgetune.cli import main as edgetune_main
from edgetune.client.runtime import ClientRuntime
from edgetune.client.transport import ServerClient, ServerError
from edgetune.config import (
    AdapterConfig,
    ClientConfig,
    ClientGroup,
    DataConfig,
    RunConfig,
    TrainConfig,
)
from edgetune.models.heads import build_task_model
from edgetune.models.zoo import load_backbone
from edgetune.onnx.layout import read_adapter_file
from edgetune.protocol import META_BACKBONE, META_CLASSES, META_GROUPS

from .conftest import JOIN_TOKEN, ApiClient, random_update, wait_for_round

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
            assert wait_for_final(folder, 1)["version"] == 1
    wait_for_finished(client)
    card = wait_for_final(folder, 2)
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


def wait_for_final(folder: Path, version: int, timeout: float = 15.0) -> dict[str, Any]:
    """The ``model.json`` card of ``folder`` once it names ``version``: the server writes the
    folder right after the round's commit, so a client may see the next round a moment before
    the files of the last one land."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = folder / "model.json"
        if path.is_file() and json.loads(path.read_text())["version"] >= version:
            return json.loads(path.read_text())
        time.sleep(0.02)
    raise AssertionError(f"{folder} did not reach version {version}")


def wait_for_finished(client: ApiClient, timeout: float = 15.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if client.round()["finished"]:
            return
        time.sleep(0.02)
    raise AssertionError("the run did not finish")


# -- real client runtimes: class names travel in their cards -------------------------------------
def _client_config(url: str, state: Path, categories: tuple[str, ...], **top: Any) -> RunConfig:
    """A tiny real client (fortunes texts, tiny BERT) of a one-round run."""
    return RunConfig(
        rounds=1,
        data=DataConfig(categories=categories, max_per_class=20),
        adapter=AdapterConfig(rank=4, n_anchors=1),
        train=TrainConfig(batch_size=8, max_length=16),
        client=ClientConfig(
            url=url, state_dir=str(state), backbone=BACKBONE, poll_s=0.1, eval_test_at_end=False
        ),
        **top,
    )


def _run_all(runtimes: list[ClientRuntime]) -> None:
    """Run the clients side by side (the round closes at their joint quorum)."""
    errors: list[BaseException] = []

    def run(rt: ClientRuntime) -> None:
        try:
            rt.run()
        except BaseException as exc:  # re-raised in the test's thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(rt,)) for rt in runtimes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors


def test_clients_cards_name_the_classes_of_the_servers_final_model(live_server, tmp_path, capsys):
    """Real client runtimes over loopback HTTP: the first card pins the family's class names,
    a client whose names differ is refused in one line while the run goes on, and the final
    model exports and classifies with real class names, naming neither backbone nor labels."""
    srv = live_server(rounds=1, min_clients=2, groups=(ClientGroup(backbone=BACKBONE),))
    first = ClientRuntime(
        _client_config(srv.url, tmp_path / "a", ("computers", "food")), JOIN_TOKEN
    )
    first.register()
    other = ClientRuntime(_client_config(srv.url, tmp_path / "b", ("computers", "law")), JOIN_TOKEN)
    with pytest.raises(ServerError) as refused:
        other.register()
    assert refused.value.status == 409 and refused.value.code == "classes_mismatch"
    assert "classes[1] is 'law', pinned 'food'" in str(refused.value)
    assert "\n" not in str(refused.value)
    same = ClientRuntime(_client_config(srv.url, tmp_path / "c", ("computers", "food")), JOIN_TOKEN)
    _run_all([first, same])
    classes = list(first.dataset.classes)
    assert sorted(classes) == ["computers", "food"]
    folder = tmp_path / "state" / "final" / first.spec.family
    card = wait_for_final(folder, 1)
    assert card["classes"] == classes and card["version"] == 1
    _, meta = read_adapter_file(folder / "adapter.safetensors")
    assert json.loads(meta[META_CLASSES]) == classes
    out = tmp_path / "onnx"
    argv = ["export", "--adapter", str(folder / "adapter.safetensors"), "--out", str(out)]
    assert edgetune_main(argv) == 0
    assert json.loads((out / "edgetune_export.json").read_text())["labels"] == classes
    capsys.readouterr()
    text = "the new laptop has a faster processor and more memory"
    assert edgetune_main(["infer", "--model", str(out), "--text", text]) == 0
    label = capsys.readouterr().out.strip().splitlines()[-1].split("\t")[0]
    assert label in classes, label


def test_a_lora_runs_final_model_is_a_peft_adapter_with_our_logits(live_server, tmp_path):
    """FedAvg-LoRA through the server: ``final/<family>/peft/`` (written from the stored tensors
    alone) loads in peft, and peft's backbone with our saved head gives the logits our client
    computes with the served global model. Tolerance atol 1e-5: the server divides the wire B
    factors by alpha / r in float32 and peft multiplies the scaling back in another order, so
    the two sides differ by float32 rounding (~1e-7 relative), not by any modelling difference."""
    peft = pytest.importorskip("peft")
    # round 1 gathers class statistics (server-fit heads), round 2 trains the LoRA factors
    srv = live_server(
        strategy="fedavg-lora", rounds=2, min_clients=1, groups=(ClientGroup(backbone=BACKBONE),)
    )
    config = _client_config(srv.url, tmp_path / "a", ("computers", "food"), strategy="fedavg-lora")
    runtime = ClientRuntime(config, JOIN_TOKEN)
    _run_all([runtime])
    family = runtime.spec.family
    wait_for_final(tmp_path / "state" / "final" / family, 2)
    folder = tmp_path / "state" / "final" / family / "peft"
    peft_config = json.loads((folder / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == BACKBONE and peft_config["r"] == 8
    # our model: the client's task model with the served global model loaded as clients load it
    served = ServerClient(srv.url, token=runtime.state["token"])
    wire, _ = served.download(f"/v1/families/{family}")
    served.close()
    runtime.hooks.load_family(runtime.handle, wire, 2)
    tokens = runtime.backbone.tokenizer(
        ["a faster processor and more memory", "a good dinner with friends"],
        padding=True,
        return_tensors="pt",
    )
    runtime.task.eval()
    with torch.no_grad():
        ours = runtime.task(tokens["input_ids"], tokens["attention_mask"])
    # theirs: a fresh backbone, peft's loader, our head from edgetune_head.safetensors
    base = load_backbone(BACKBONE).model.eval()
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    from safetensors import safe_open

    with safe_open(str(folder / "edgetune_head.safetensors"), "pt") as head_file:
        assert json.loads(head_file.metadata()[META_CLASSES]) == list(runtime.dataset.classes)
        weight, bias = (head_file.get_tensor(f"family.head.{k}") for k in ("weight", "bias"))
    with torch.no_grad():
        hidden = loaded(**tokens).last_hidden_state
        plain = base(**tokens).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # SequenceClassifier's masked mean
    theirs = pooled @ weight.T + bias
    assert (hidden - plain).abs().max() > 1e-3  # the served LoRA factors change the backbone
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
