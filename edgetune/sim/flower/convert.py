"""Our named tensors and update metadata in Flower's records, and back.

Tensor names are the wire names of `edgetune.protocol` in both transports. Flower's `Array`
has no bfloat16, so half-precision tensors travel as float32 with their dtype named in a
``dtypes`` entry of the message's ConfigRecord and are cast back on arrival. An update's
metadata travels as the exact string header our HTTP upload carries
(`UpdateMeta.to_metadata`), so the server re-encodes a reply into the bytes our server would
have received and validates it with the same code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord

from edgetune.strategies.aggregation import TensorDict

#: Message record names (one RecordDict per message).
ARRAYS_GLOBAL = "global"
ARRAYS_FAMILY = "family"
ARRAYS_UPDATE = "update"
CONFIG = "config"
META = "meta"
INFO = "info"
METRICS = "metrics"
RESULT = "result"

#: Message types (`ClientApp` handlers).
DESCRIBE = "query.describe"
TRAIN = "train"
FINISH = "query.finish"

_UNSUPPORTED = (torch.bfloat16, torch.float16)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def to_record(tensors: Mapping[str, torch.Tensor]) -> tuple[ArrayRecord, str]:
    """(ArrayRecord, JSON of the names sent widened to float32 -> their dtype)."""
    widened = {n: str(t.dtype).removeprefix("torch.") for n, t in tensors.items()
               if t.dtype in _UNSUPPORTED}  # fmt: skip
    plain = {
        n: (t.float() if n in widened else t).detach().contiguous().cpu()
        for n, t in tensors.items()
    }
    return ArrayRecord(plain), json.dumps(widened, sort_keys=True)


def from_record(record: ArrayRecord, dtypes: str = "{}") -> TensorDict:
    """Named torch tensors of ``record``, half-precision ones cast back (see `to_record`)."""
    narrow = json.loads(dtypes or "{}")
    if not isinstance(narrow, dict):
        raise ValueError(f"dtypes entry is not a JSON object: {dtypes[:80]!r}")
    out = record.to_torch_state_dict()
    for name, dtype in narrow.items():
        if name in out and dtype in _DTYPES:
            out[name] = out[name].to(_DTYPES[dtype])
    return out


def meta_record(metadata: Mapping[str, str]) -> ConfigRecord:
    """An update's string header as a ConfigRecord (str -> str)."""
    return ConfigRecord({str(k): str(v) for k, v in metadata.items()})


def record_meta(record: ConfigRecord) -> dict[str, str]:
    """The string header back; a non-string value raises ValueError naming the key."""
    out = {}
    for key, value in record.items():
        if not isinstance(value, str):
            raise ValueError(f"metadata {key!r} is {type(value).__name__}, not a string")
        out[key] = value
    return out


def flatten_state(state: Mapping[str, Mapping[str, torch.Tensor]]) -> TensorDict:
    """``{"global": {...}, "family/f": {...}}`` -> one dict keyed ``<model>::<tensor>``."""
    return {f"{model}::{name}": t for model, ts in state.items() for name, t in ts.items()}


def unflatten_state(flat: Mapping[str, torch.Tensor]) -> dict[str, TensorDict]:
    """Inverse of `flatten_state`."""
    state: dict[str, TensorDict] = {}
    for key, t in flat.items():
        model, sep, name = key.partition("::")
        if not sep:
            raise ValueError(f"state key {key!r} is not <model>::<tensor>")
        state.setdefault(model, {})[name] = t
    return state
