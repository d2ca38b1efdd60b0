"""edgetune.strategies: one registry of federated strategies, server side and client side.

`registry` is the only list of strategy names (torch-free, so `edgetune.config` validates
against it); `base` holds the server-side `Strategy` (Flower-like verbs over the pure functions
of `aggregation`); `hooks` the client-side `ClientHooks`; `fedadapter` and `lora` the
strategies themselves.
"""

from edgetune._lazy import lazy_face

__getattr__, __dir__, __all__ = lazy_face(
    __name__,
    {
        "registry": (
            "NAMES",
            "STRATEGIES",
            "StrategyDef",
            "get_strategy",
            "make_client_hooks",
            "make_strategy",
        ),
        "base": ("GLOBAL", "RoundResult", "Strategy", "check_reply", "family_model"),
        "hooks": ("ClientHooks",),
        "aggregation": ("ClientUpdate", "TensorDict"),
    },
)
