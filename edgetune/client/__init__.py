"""edgetune.client: the lightweight client runtime.

`runtime` (the round loop: fetch, train, evaluate, upload, persist), `state` (the state
directory, written atomically), `transport` (HTTP to the server, with retries), `trainer`
(local training and evaluation) and `cli` (`edgetune client`, `python -m edgetune.client`).
What a strategy does differently on a client lives in its hooks (`edgetune.strategies`).
"""

from edgetune._lazy import lazy_face

__getattr__, __dir__, __all__ = lazy_face(
    __name__,
    {
        "runtime": ("ClientRuntime",),
        "state": ("StateDir", "atomic_write"),
        "transport": ("ServerClient", "ServerError"),
        "trainer": ("EncodedSplit", "evaluate", "train_local"),
    },
)
