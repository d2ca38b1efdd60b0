"""edgetune.protocol: the wire contract both sides import (it imports neither side).

Rooms: `names` (tensor wire names, groups, bundles, metadata keys, modes; torch-free), `spec`
(AdapterSpec and the upload schema; torch-free), `card` (the client card: class names sent
at registration; torch-free), `codec` (safetensors payloads), `update`
(update metadata), `compression` (int8 codec, error feedback, bundle selection), `initial`
(round-0 tensors), `final` (the final-model folder every run writes per family) and `peft`
(LoRA factors as a PEFT adapter folder, from tensors alone). Names
load on first use, so the torch-free facts cost no torch import.

HTTP flow (all under ``/v1``; errors are JSON ``{"error": code, "detail": message, ...}``):

1. ``POST /v1/register`` with ``Authorization: Bearer <join token>`` and JSON
   ``{"spec": AdapterSpec.to_dict(), "tier": "nf4", "card": ClientCard.to_dict()}`` -> 201
   ``{"client_id", "token", ...}``. The first spec of a family is pinned; a different one is
   409 ``spec_mismatch``. The card (optional; class names) is pinned likewise: other class
   names are 409 ``classes_mismatch``, a malformed card 422 ``bad_card``.
2. ``GET /v1/rounds/current`` (``Authorization: Bearer <client token>``) -> round number,
   state, deadline, ``accepting``, ``downloads`` and the ``upload`` path.
3. ``GET /v1/global`` and ``GET /v1/families/<family>`` -> safetensors (header
   ``X-EdgeTune-Version``: the round that produced it, 0 = initial). ``?version=N`` returns the
   model as it was after round N.
4. ``PUT /v1/rounds/<round>/updates/<client_id>`` with body ``encode_update(...)`` -> 201; an
   identical retry -> 200; a different second upload -> 409 ``duplicate_upload``; a closed or
   other round -> 409 ``round_closed``. Global tensors are ``trained - downloaded`` deltas,
   family and LoRA tensors values, ``stats.*`` class statistics (specs with ``stats``; the
   server fits each family's head from them). Optional knobs in the metadata:
   ``edgetune.bundles`` (a partial update, e.g. ``"global"`` or ``"stats"``) and
   ``edgetune.compression = "int8"`` (every tensor but the statistics as I8 plus
   ``<name>.__scale__``).
5. ``GET /v1/status`` (join or client token), ``GET /v1/health``, ``GET /v1/openapi.json``.
"""

from edgetune._lazy import lazy_face
from edgetune.protocol import names as _names  # torch-free: the vocabulary loads eagerly

__getattr__, __dir__, __all__ = lazy_face(
    __name__,
    {
        "names": tuple(_names.__all__),
        "spec": ("AdapterSpec", "ProtocolError", "TensorSpec", "first_block_of"),
        "card": ("CARD_BOUNDS", "ClientCard"),
        "codec": (
            "MAX_HEADER_BYTES",
            "Payload",
            "TensorEntry",
            "decode_payload",
            "encode_model",
            "encode_payload",
            "parse_header",
        ),
        "update": ("UpdateMeta", "encode_update"),
        "compression": (
            "ErrorFeedback",
            "bundles_to_send",
            "compress_update",
            "decompress_tensors",
            "dequantize_int8",
            "family_due",
            "int8_wire_schema",
            "quantize_int8",
            "select_bundles",
            "wire_group",
        ),
        "initial": ("family_seed", "initial_tensors"),
        "final": ("FINAL_ADAPTER", "FINAL_CARD", "FINAL_DIR", "final_card", "write_final"),
        "peft": ("PEFT_DIR", "unscale_wire_lora", "write_peft_folder"),
    },
)
