"""edgetune.sim.flower: our strategies and clients on Flower's engines (``edgetune[flower]``).

`strategy` (a Flower Strategy over our strategy registry: per-family messages, a describe
round, deadline, checkpoint), `node` and `client_app` (a ClientApp running our client
runtime), `engine` (`edgetune simulate --engine flower`), `evaluate` (server-side evaluation
and the report), `app` (the ServerApp and the app folder for SuperLink/SuperNode
deployment), `checkpoint`, `convert` (records) and `env` (offline switches). Only this
sub-package imports flwr.
"""

from edgetune._lazy import lazy_face

__getattr__, __dir__, __all__ = lazy_face(
    __name__,
    {
        "strategy": ("EdgeTuneStrategy",),
        "client_app": ("make_client_app",),
        "node": ("NodeRuntime",),
        "engine": ("run_flower",),
        "checkpoint": ("Checkpoint", "load_checkpoint", "save_checkpoint"),
        "env": ("apply_offline_env",),
    },
)
