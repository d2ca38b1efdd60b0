"""The client side of a strategy: how a trained adapter becomes an upload and back.

`ClientHooks` works on an adapter handle (`edgetune.adapters`: named tensor groups with
``state_dict_for`` / ``load_group``) and plain tensor dicts, so this module imports no model
code. The client runtime owns the round loop and calls, per round::

    hooks.load_family(handle, family_tensors, served_version)   # the server's family model
    ... local training ...
    hooks.upload_tensors(handle, sent_global)                   # what goes up (wire names)

``extra_state`` / ``load_extra_state`` persist what a strategy keeps between rounds beside the
adapter (FLoRA's folded updates), so a restarted client continues exactly.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from edgetune.protocol import GROUP_FAMILY, GROUP_GLOBAL, GROUP_PRIVATE

TensorDict = dict[str, Tensor]


class ClientHooks:
    """Default hooks (FedAdapter): global branch as deltas, family bundle as values."""

    #: the adapter groups a client saves in its state dir
    saved_groups: ClassVar[tuple[str, ...]] = (GROUP_GLOBAL, GROUP_FAMILY, GROUP_PRIVATE)
    #: False for strategies that train without a server (local-only)
    federated: ClassVar[bool] = True

    def load_family(self, handle: Any, tensors: TensorDict, version: int) -> None:
        """Load the server's family model (as of round ``version``) into the adapter."""
        handle.load_group(GROUP_FAMILY, tensors)

    def upload_tensors(self, handle: Any, sent_global: TensorDict) -> TensorDict:
        """The wire tensors of an update: global ``trained - sent`` deltas, family values."""
        trained = handle.state_dict_for(GROUP_GLOBAL)
        deltas = {n: trained[n] - sent_global[n] for n in trained}
        return {**deltas, **handle.state_dict_for(GROUP_FAMILY)}

    def extra_state(self, handle: Any) -> tuple[TensorDict, int]:
        """Tensors to persist beside the adapter and the round they belong to (none here)."""
        return {}, -1

    def load_extra_state(self, handle: Any, tensors: TensorDict, version: int) -> None:
        """Restore what `extra_state` returned (``version``: the round it was saved at)."""
