"""The Flower glue without engines: records, checkpoint, fault drill, app folder, CLI."""

import pytest
import torch
from conftest import TINY

from edgetune.errors import EdgeTuneError
from edgetune.sim.flower import convert as cv
from edgetune.sim.flower.checkpoint import (
    MODELS_FILE,
    Checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from edgetune.sim.flower.client_app import parse_fail
from edgetune.sim.flower.strategy import error_reason


def test_tensors_survive_flowers_records_with_their_dtypes():
    tensors = {
        "global.anchor1.C": torch.randn(4, 4),
        "family.layer0.D": torch.randn(8, 4).to(torch.bfloat16),  # Flower has no bfloat16
        "family.head.weight": torch.randn(3, 8).to(torch.float16),
        "lora.q.A.__scale__": torch.tensor([0.5]),
        "lora.q.A": torch.randint(-127, 127, (2, 8), dtype=torch.int8),
    }
    record, dtypes = cv.to_record(tensors)
    back = cv.from_record(record, dtypes)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_model_state_flattens_to_one_record_and_back():
    state = {"global": {"global.a.C": torch.ones(2)}, "family/f": {"family.h": torch.zeros(3)}}
    flat = cv.flatten_state(state)
    assert set(flat) == {"global::global.a.C", "family/f::family.h"}
    back = cv.unflatten_state(flat)
    assert torch.equal(back["family/f"]["family.h"], torch.zeros(3))
    with pytest.raises(ValueError, match="is not <model>::<tensor>"):
        cv.unflatten_state({"no-separator": torch.ones(1)})


def test_update_metadata_must_be_strings():
    assert cv.record_meta(cv.meta_record({"edgetune.round": "3"})) == {"edgetune.round": "3"}
    with pytest.raises(ValueError, match=r"'edgetune\.round' is int"):
        cv.record_meta(cv.ConfigRecord({"edgetune.round": 3}))


def test_checkpoint_round_trip_and_a_mismatched_pair_is_refused(tmp_path):
    assert load_checkpoint(tmp_path) is None
    ckpt = Checkpoint(
        round=2, strategy="fedadapter",
        models={"global": {"global.a.C": torch.randn(4, 4)}, "family/f": {"family.h": torch.randn(3)}},
        versions={"global": 2, "family/f": 1}, specs={"f": "{}"}, accepted={"c0": 2, "c1": 1},
        history=[{"round": 1}, {"round": 2}],
    )  # fmt: skip
    save_checkpoint(tmp_path, ckpt)
    back = load_checkpoint(tmp_path)
    assert (back.round, back.versions, back.accepted, back.history) == (
        2, ckpt.versions, ckpt.accepted, ckpt.history,
    )  # fmt: skip
    assert torch.equal(back.models["global"]["global.a.C"], ckpt.models["global"]["global.a.C"])
    ckpt.models["family/f"]["family.h"] += 1  # a newer tensor file beside the older JSON
    save_checkpoint(tmp_path / "newer", ckpt)
    (tmp_path / MODELS_FILE).write_bytes((tmp_path / "newer" / MODELS_FILE).read_bytes())
    with pytest.raises(EdgeTuneError, match="does not match") as err:
        load_checkpoint(tmp_path)
    assert "\n" not in str(err.value)


def test_fault_drill_syntax():
    assert parse_fail("") == {}
    assert parse_fail("c1@1, c2@3,c1@2") == {"c1": {1, 2}, "c2": {3}}
    for bad in ("c1", "c1@x", "@2"):
        with pytest.raises(ValueError, match="use CLIENT@ROUND"):
            parse_fail(bad)


def test_an_error_reply_is_reduced_to_its_message():
    ray_style = (
        "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=1)\nTraceback (most recent call last):\n"
        '  File "x.py", line 1\nRuntimeError: c1: injected failure in round 1 (fail drill)\n\n'
        "flwr.clientapp.client_app.ClientAppException: \n"
        "Exception ClientAppException occurred. Message: c1: injected failure in round 1 (fail drill)\n"
    )  # fmt: skip
    assert error_reason(ray_style) == "c1: injected failure in round 1 (fail drill)"
    assert error_reason("Traceback\nValueError: bad shape\n") == "ValueError: bad shape"
    assert error_reason("Node Unavailable") == "Node Unavailable"


def test_the_generated_app_folder_is_a_valid_flower_app(tmp_path):
    from flwr.cli.config_utils import load_and_validate

    from edgetune.sim.flower.app import write_app

    path = write_app(tmp_path / "app", TINY, tmp_path / "out", **{"min-nodes": 3})
    config, warnings = load_and_validate(path, check_module=True)  # imports both components
    assert config is not None, warnings
    app = config["tool"]["flwr"]["app"]
    assert app["components"]["serverapp"] == "edgetune.sim.flower.app:server_app"
    assert app["config"]["config"] == str(TINY.resolve()) and app["config"]["min-nodes"] == 3
    commands = (tmp_path / "app" / "commands.sh").read_text()
    for needle in ("--enable-supernode-auth", "--ssl-certfile", "flwr supernode register",
                   "--auth-supernode-private-key", "FLWR_TELEMETRY_ENABLED=0",
                   "--disable-runtime-dependency-installation", "partition-id=2 num-partitions=3"):  # fmt: skip
        assert needle in commands, needle


def test_simulate_engine_flower_refuses_a_bad_run_in_one_line_before_starting(tmp_path, capsys):
    from edgetune.cli import main

    out = tmp_path / "run"
    args = ["simulate", "--engine", "flower", "--config", str(TINY), "--out", str(out)]
    assert main([*args, "--set", "server.min_clients=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "server.min_clients=4 exceeds the 3 clients" in err and "\n" not in err
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["simulate", "--engine", "ray", "--config", str(TINY)])
    assert "invalid choice: 'ray'" in capsys.readouterr().err
