"""edgetune.config: typed, torch-free configuration shared by simulate, client and server.

`sections` holds one dataclass per TOML section, `run` the whole run (`RunConfig`,
`load_config`, `config_from_dict`), `toml` the TOML reader and ``--set`` overrides, and
`reference` the key table the README shows.
"""

from edgetune._lazy import lazy_face

__getattr__, __dir__, __all__ = lazy_face(
    __name__,
    {
        "sections": (
            "AdapterConfig",
            "ClientConfig",
            "ClientGroup",
            "CommConfig",
            "DataConfig",
            "LoraConfig",
            "ServerConfig",
            "TrainConfig",
            "parse_blocks",
        ),
        "run": ("SECTIONS", "RunConfig", "config_from_dict", "config_to_dict", "load_config"),
        "toml": ("apply_override", "parse_override", "read_toml"),
        "reference": ("config_reference",),
    },
)
