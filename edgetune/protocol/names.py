"""The shared vocabulary of EdgeTune: tensor wire names, groups, bundles, metadata keys, modes.

Every side (client runtime, server, export, profile, config) imports these facts from here and
nowhere else. This module imports nothing but the standard library (no torch), so
`edgetune.config` and the server's validation can use it freely.

FedAdapter wire names (K anchors, adapted blocks l, rank r, width d)::

    global.anchor{k}.C        [r, r]     k = 1..K   (identical across families)
    global.anchor{k}.q        [r]
    family.layer{l}.D         [d, r]
    family.layer{l}.b_D       [r]
    family.layer{l}.C         [r, r]
    family.layer{l}.q         [r]
    family.layer{l}.U         [r, d]
    family.layer{l}.b_U       [d]
    family.layer{l}.alpha_logits [n_b(l)]     gate = "layer"
    family.layer{l}.W_alpha      [r, n_b(l)]  gate = "token"
    family.head.weight        [n_classes, d]
    family.head.bias          [n_classes]
    private.layer{l}.C / .q   never leave the client

LoRA baselines: ``lora.{module}.A`` [rank, d_in], ``lora.{module}.B`` [d_out, rank] and the head.

Class statistics (the ``stats`` bundle of a spec with ``stats`` set; K classes, features of the
pooled state the head sees, float32, never compressed; `edgetune.strategies.class_stats`)::

    stats.own.gram / .sums / .counts       [d(d+1)/2] / [K, d] / [K]  the model as received
    stats.frozen.gram / .sums / .counts    the same, frozen backbone ("source" specs only)
    stats.bridge.{family}.gram             [d_b(d_b+1)/2]  frozen features of another family b
    stats.bridge.{family}.cross            [d_b, d]    sum of x_b x^T over the same texts
    (a Gram travels as its upper triangle, row by row: `class_stats.pack_symmetric`)
"""

from __future__ import annotations

__all__ = [
    "API_PREFIX",
    "BRANCHES",
    "BUNDLE_FAMILY",
    "BUNDLE_GLOBAL",
    "BUNDLE_STATS",
    "CARD_CLASSES",
    "CARD_FAMILY",
    "CARD_VERSION",
    "CARD_VERSION_KEY",
    "COMPRESSIONS",
    "COMPRESSION_INT8",
    "COMPRESSION_NONE",
    "DTYPE_NAMES",
    "GATES",
    "GATE_LEAF",
    "GROUPS",
    "GROUP_FAMILY",
    "GROUP_GLOBAL",
    "GROUP_HEAD",
    "GROUP_LORA",
    "GROUP_PRIVATE",
    "GROUP_STATS",
    "HEAD_BIAS",
    "HEAD_NAMES",
    "HEAD_WEIGHT",
    "KINDS",
    "KIND_FEDADAPTER",
    "KIND_LORA",
    "META_ADAPTER_CONFIG",
    "META_BACKBONE",
    "META_BUNDLES",
    "META_CLASSES",
    "META_COMPRESSION",
    "META_DTYPE",
    "META_ENCODING",
    "META_FAMILY",
    "META_FINGERPRINT",
    "META_GROUPS",
    "META_KIND",
    "META_METRICS",
    "META_NUM_SAMPLES",
    "META_PROTOCOL",
    "META_ROUND",
    "META_SPEC",
    "META_SPEC_HASH",
    "PAYLOAD_FAMILY",
    "PAYLOAD_GLOBAL",
    "PAYLOAD_UPDATE",
    "PROTOCOL_VERSION",
    "QUANT_MODES",
    "QUANT_NONE",
    "REGISTER_CARD",
    "SCALE_SUFFIX",
    "STATS_KINDS",
    "STATS_LEAVES",
    "UPDATE_ENCODING",
    "UPLOAD_GROUPS",
    "anchor_blocks",
    "anchor_layers",
    "branch_leaf_shapes",
    "family_name",
    "global_name",
    "group_of",
    "head_name",
    "in_group",
    "layer_leaf_shapes",
    "lora_factor",
    "lora_name",
    "private_name",
    "stats_bridge_name",
    "stats_name",
]

PROTOCOL_VERSION = 1
API_PREFIX = "/v1"

# -- tensor groups ----------------------------------------------------------------------------
GROUP_GLOBAL = "global"
GROUP_FAMILY = "family"
GROUP_PRIVATE = "private"
GROUP_LORA = "lora"
GROUP_HEAD = "head"  # the family.head.* subset of the family group
GROUP_STATS = "stats"  # class statistics (uploaded, never stored in a model)
UPLOAD_GROUPS = (GROUP_GLOBAL, GROUP_FAMILY, GROUP_LORA)
#: Every group an adapter handle can name.
GROUPS = (GROUP_GLOBAL, GROUP_FAMILY, GROUP_PRIVATE, GROUP_HEAD, GROUP_LORA)

#: FedAdapter branches in their fixed order (the fused op stacks them in this order).
BRANCHES = (GROUP_GLOBAL, GROUP_FAMILY, GROUP_PRIVATE)
GATES = ("layer", "token")
GATE_LEAF = {"layer": "alpha_logits", "token": "W_alpha"}

# -- adapter kinds (what a client trains) and backbone quantization tiers ---------------------
KIND_FEDADAPTER = "fedadapter"
KIND_LORA = "lora"
KINDS = (KIND_FEDADAPTER, KIND_LORA)
QUANT_NONE = "none"
QUANT_MODES = (QUANT_NONE, "int8", "nf4", "fp4")

# -- metadata keys of a safetensors header (all values are strings) ----------------------------
META_PROTOCOL = "edgetune.protocol"
META_KIND = "edgetune.kind"  # "update" | "global" | "family"
META_FAMILY = "edgetune.family"
META_ROUND = "edgetune.round"
META_SPEC = "edgetune.spec"  # canonical JSON of the AdapterSpec
META_SPEC_HASH = "edgetune.spec_hash"
META_FINGERPRINT = "edgetune.fingerprint"
META_DTYPE = "edgetune.dtype"
META_COMPRESSION = "edgetune.compression"
META_ENCODING = "edgetune.encoding"
META_NUM_SAMPLES = "edgetune.num_samples"
META_METRICS = "edgetune.metrics"  # JSON object of metric name -> finite number
META_BUNDLES = "edgetune.bundles"  # optional: comma-separated bundles sent (default: all)
# Adapter files a client saves (``AdapterHandle.save``):
META_ADAPTER_CONFIG = "edgetune.adapter_config"
META_GROUPS = "edgetune.groups"
META_BACKBONE = "edgetune.backbone"  # the zoo name or folder the adapter was trained on
META_CLASSES = "edgetune.classes"  # JSON list of the head's class names, in order

# -- the client card (`edgetune.protocol.card`), sent with a registration --------------------
#: Key of the card in the ``POST /v1/register`` JSON body (beside ``spec`` and ``tier``).
REGISTER_CARD = "card"
#: The card's own version: a server refuses a card whose version it does not read.
CARD_VERSION = 1
CARD_VERSION_KEY = "version"
CARD_FAMILY = "family"
CARD_CLASSES = "classes"  # the head's class names, in row order

PAYLOAD_UPDATE = "update"
PAYLOAD_GLOBAL = "global"
PAYLOAD_FAMILY = "family"

#: What each group of an upload carries: deltas for the global branch, values otherwise.
UPDATE_ENCODING = "global=delta;family=value;lora=value"
COMPRESSION_NONE = "none"
COMPRESSION_INT8 = "int8"
COMPRESSIONS = (COMPRESSION_NONE, COMPRESSION_INT8)
#: With ``compression="int8"`` every tensor ``<name>`` travels as I8 plus ``<name>.__scale__``.
SCALE_SUFFIX = ".__scale__"

#: Upload bundles: the global branch (FedAdapter only) and the family bundle (everything else).
BUNDLE_GLOBAL = "global"
BUNDLE_FAMILY = "family"
BUNDLE_STATS = "stats"  # class statistics of the client's pooled features (server-fit heads)

#: What a spec's ``stats`` field asks of a client: "" nothing; "own" statistics of its model as
#: received; "source" those plus its frozen backbone's (a device's first client: the statistics
#: other families map into their own space).
STATS_KINDS = ("", "own", "source")
STATS_LEAVES = ("gram", "sums", "counts")

#: dtype name of a spec -> safetensors dtype tag.
DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}

HEAD_WEIGHT = "family.head.weight"
HEAD_BIAS = "family.head.bias"
HEAD_NAMES = (HEAD_WEIGHT, HEAD_BIAS)


# -- wire names ---------------------------------------------------------------------------------
def global_name(anchor: int, leaf: str) -> str:
    """``global.anchor{k}.{leaf}`` (anchors count from 1)."""
    return f"{GROUP_GLOBAL}.anchor{anchor}.{leaf}"


def family_name(block: int, leaf: str) -> str:
    """``family.layer{l}.{leaf}``: D, b_D, C, q, U, b_U, alpha_logits or W_alpha."""
    return f"{GROUP_FAMILY}.layer{block}.{leaf}"


def private_name(block: int, leaf: str) -> str:
    """``private.layer{l}.{leaf}``: C or q, never uploaded."""
    return f"{GROUP_PRIVATE}.layer{block}.{leaf}"


def head_name(leaf: str) -> str:
    return f"{GROUP_FAMILY}.head.{leaf}"


def stats_name(part: str, leaf: str) -> str:
    """``stats.{part}.{leaf}``: part ``own`` or ``frozen``, leaf one of STATS_LEAVES."""
    return f"{GROUP_STATS}.{part}.{leaf}"


def stats_bridge_name(family: str, leaf: str) -> str:
    """``stats.bridge.{family}.{leaf}``: leaf ``gram`` or ``cross``."""
    return f"{GROUP_STATS}.bridge.{family}.{leaf}"


def lora_name(module: str, leaf: str) -> str:
    """``lora.{module}.A`` or ``.B``."""
    return f"{GROUP_LORA}.{module}.{leaf}"


def group_of(name: str) -> str:
    """The finest group of a wire name (``head`` for ``family.head.*``)."""
    return GROUP_HEAD if name.startswith(f"{GROUP_FAMILY}.head.") else name.split(".", 1)[0]


def in_group(name: str, group: str) -> bool:
    """True when ``name`` belongs to ``group`` (the family group includes the head)."""
    finest = group_of(name)
    return finest == group or (group == GROUP_FAMILY and finest == GROUP_HEAD)


def lora_factor(name: str) -> tuple[str, str] | None:
    """``(module, leaf)`` of a LoRA factor name ``lora.<module>.A|B``, else None."""
    group, _, rest = name.partition(".")
    module, _, leaf = rest.rpartition(".")
    if group != GROUP_LORA or not module or leaf not in ("A", "B"):
        return None
    return module, leaf


# -- anchor placement -----------------------------------------------------------------------------
def anchor_layers(n_layers: int, n_anchors: int) -> list[int]:
    """Index of each global anchor among ``n_layers`` adapted blocks: ``round_half_up(k n / K) - 1``.

    With every block adapted this is DESIGN's ``round(k L / K) - 1`` for k = 1..K.
    """
    if not 1 <= n_anchors <= n_layers:
        raise ValueError(f"n_anchors={n_anchors} must be in 1..n_layers={n_layers}")
    return [(2 * k * n_layers + n_anchors) // (2 * n_anchors) - 1 for k in range(1, n_anchors + 1)]


def anchor_blocks(blocks: list[int], n_anchors: int) -> list[int]:
    """The blocks (of the adapted ``blocks``, in order) that hold the K global anchors."""
    return [blocks[i] for i in anchor_layers(len(blocks), n_anchors)]


# -- layouts ---------------------------------------------------------------------------------------
def layer_leaf_shapes(d: int, r: int, n_branches: int, gate: str) -> dict[str, tuple[int, ...]]:
    """Leaf -> shape of one adapted block's family tensors (``family.layer{l}.<leaf>``)."""
    if gate not in GATE_LEAF:
        raise ValueError(f"gate={gate!r} must be one of {GATES}")
    gate_shape = (n_branches,) if gate == "layer" else (r, n_branches)
    return {
        "D": (d, r),
        "b_D": (r,),
        "C": (r, r),
        "q": (r,),
        "U": (r, d),
        "b_U": (d,),
        GATE_LEAF[gate]: gate_shape,
    }


def branch_leaf_shapes(r: int) -> dict[str, tuple[int, ...]]:
    """Leaf -> shape of one branch slot (global anchor or private layer): C [r, r], q [r]."""
    return {"C": (r, r), "q": (r,)}
