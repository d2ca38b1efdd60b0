"""The Flower ClientApp: our client runtime behind Flower's message handlers.

Handlers: ``query.describe`` (the node's family, spec and tier, for the server's discovery
round), ``train`` (one round of `NodeRuntime.train_round`) and ``query.finish`` (the final
personal test accuracy and byte counts). A handler that raises becomes an error reply on the
server, which logs and skips it; the node process keeps running.

Settings come from the app's run config (``flwr run -c``; `edgetune.sim.flower.app`) over
the defaults given to `make_client_app` (what `edgetune simulate --engine flower` passes):

- ``config``: the run config file (TOML or JSON) every node reads;
- ``out``: the folder under which client ``c<i>`` keeps ``clients/c<i>/`` (node config
  ``state-dir`` replaces it on a real device);
- ``fail``: fault drill, ``"c1@1,c2@3"`` makes client c1 raise in round 1 and c2 in round 3;
- ``torch-threads``: intra-op threads per ClientApp (default 1).

The node's client index is its ``partition-id`` (node config), the shard it holds and the
``[[group]]`` tier it runs follow from it as in our own engine (`harness.client_configs`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edgetune.config import load_config
from edgetune.sim.flower import convert as cv
from edgetune.sim.flower.node import NodeRuntime
from edgetune.sim.harness import client_configs

log = logging.getLogger(__name__)

#: Runtimes kept per process (a Ray actor serves many virtual clients; state is on disk).
CACHE_SIZE = 8
_RUNTIMES: OrderedDict[tuple[str, int, str], NodeRuntime] = OrderedDict()


def parse_fail(text: str) -> dict[str, set[int]]:
    """``"c1@1,c2@3"`` -> ``{"c1": {1}, "c2": {3}}``; a malformed item raises ValueError."""
    out: dict[str, set[int]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, rnd = item.partition("@")
        if not sep or not name or not rnd.isdigit():
            raise ValueError(f"fail={text!r}: use CLIENT@ROUND items, e.g. 'c1@1,c2@3'")
        out.setdefault(name, set()).add(int(rnd))
    return out


def settings_of(defaults: Mapping[str, Any], context: Context) -> dict[str, Any]:
    """The app's run config over ``defaults``; refuses a run without a ``config``."""
    settings = {**defaults, **dict(context.run_config)}
    if not settings.get("config"):
        raise ValueError("the ClientApp needs run config key 'config' (a run config file)")
    return settings


def node_runtime(settings: Mapping[str, Any], node_config: Mapping[str, Any]) -> NodeRuntime:
    """This node's runtime (cached per process; rebuilt from its state dir when evicted)."""
    index = int(node_config.get("partition-id", 0))
    path = str(settings["config"])
    out = Path(str(settings.get("out") or "."))
    key = (path, index, str(node_config.get("state-dir", "")))
    if key in _RUNTIMES:
        _RUNTIMES.move_to_end(key)
        return _RUNTIMES[key]
    config = load_config(path)
    configs = client_configs(config, out, "")
    if not 0 <= index < len(configs):
        raise ValueError(f"partition-id {index} is outside the {len(configs)} clients of {path}")
    mine = configs[index]
    if node_config.get("state-dir"):
        client = dataclasses.replace(mine.client, state_dir=str(node_config["state-dir"]))
        mine = dataclasses.replace(mine, client=client)
    runtime = NodeRuntime(mine, f"c{index}")
    _RUNTIMES[key] = runtime
    while len(_RUNTIMES) > CACHE_SIZE:
        _RUNTIMES.popitem(last=False)
    return runtime


def _reply(msg: Message, **records: Any) -> Message:
    return Message(RecordDict(records), reply_to=msg)


def _describe(msg: Message, ctx: Context, defaults: Mapping[str, Any]) -> Message:
    settings = settings_of(defaults, ctx)
    torch.set_num_threads(int(settings.get("torch-threads", 1)))
    info = node_runtime(settings, ctx.node_config).describe()
    return _reply(msg, **{cv.INFO: ConfigRecord(info)})


def _train(msg: Message, ctx: Context, defaults: Mapping[str, Any]) -> Message:
    settings = settings_of(defaults, ctx)
    torch.set_num_threads(int(settings.get("torch-threads", 1)))
    runtime = node_runtime(settings, ctx.node_config)
    conf = msg.content[cv.CONFIG]
    round_id = int(conf["round"])
    if round_id in parse_fail(str(settings.get("fail", ""))).get(runtime.name, set()):
        raise RuntimeError(f"{runtime.name}: injected failure in round {round_id} (fail drill)")
    dtypes = json.loads(str(conf.get("dtypes", "{}")))
    glob = cv.from_record(msg.content[cv.ARRAYS_GLOBAL], json.dumps(dtypes.get("global", {})))
    fam = cv.from_record(msg.content[cv.ARRAYS_FAMILY], json.dumps(dtypes.get("family", {})))
    tensors, meta, metrics = runtime.train_round(
        round_id, glob, fam, int(conf["family_version"]), int(conf["accepted_round"])
    )
    record, widened = cv.to_record(tensors)
    meta = {**meta, "flower.dtypes": widened}
    return _reply(
        msg,
        **{
            cv.ARRAYS_UPDATE: record,
            cv.META: cv.meta_record(meta),
            cv.METRICS: MetricRecord(metrics),
        },
    )


def _finish(msg: Message, ctx: Context, defaults: Mapping[str, Any]) -> Message:
    runtime = node_runtime(settings_of(defaults, ctx), ctx.node_config)
    result = {k: v for k, v in runtime.final_result().items() if isinstance(v, int | float)}
    return _reply(
        msg, **{cv.RESULT: MetricRecord(result), cv.INFO: ConfigRecord({"client": runtime.name})}
    )


def make_client_app(defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose settings default to ``defaults`` (see the module doc)."""
    base = dict(defaults or {})
    app = ClientApp()

    @app.query("describe")
    def describe(msg: Message, ctx: Context) -> Message:
        return _describe(msg, ctx, base)

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        return _train(msg, ctx, base)

    @app.query("finish")
    def finish(msg: Message, ctx: Context) -> Message:
        return _finish(msg, ctx, base)

    return app


#: The deployment entry point (``clientapp = "edgetune.sim.flower.client_app:app"``).
app = make_client_app()
