"""A client runtime driven by Flower messages instead of HTTP polling.

`NodeRuntime` is our `ClientRuntime` (the same backbone, adapter, strategy hooks, trainer and
state directory); only the transport differs: the server's tensors arrive in a message and
the update leaves in the reply. What the node keeps between rounds stays in its state dir
(private branch, strategy extras, int8 residuals, bytes sent, its RNG stream), so a node whose process is
new for every message (Flower's deployment engine) or whose run restarts continues exactly.

Error feedback: the node cannot know whether its reply made the round (it may arrive after the
deadline or be refused), so it keeps the residual of each reply *pending* and the server says
in the next instruction (``accepted_round``) which round of this node it aggregated last; the
pending residual is committed only then, as our HTTP client commits it on a 201.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from edgetune.client.runtime import ClientRuntime
from edgetune.client.trainer import EncodedSplit, evaluate
from edgetune.protocol import GROUP_GLOBAL, ErrorFeedback, UpdateMeta

log = logging.getLogger(__name__)

PENDING_FEEDBACK = "error_feedback.pending.safetensors"
RNG_FILE = "rng.safetensors"  # the client's global RNG stream between rounds
TensorDict = dict[str, torch.Tensor]


class NodeRuntime(ClientRuntime):
    """One client of a run on a Flower node; ``name`` is its report name (``c<index>``)."""

    def __init__(self, config: Any, name: str) -> None:
        torch.manual_seed(config.train.seed)  # as `edgetune client` seeds before its runtime
        super().__init__(config)
        self.name = name
        saved = self.files.read_tensors(RNG_FILE)
        self.rng = saved["cpu"] if saved else torch.get_rng_state()

    def describe(self) -> dict[str, Any]:
        """What the query round learns about this node: name, family, spec and tier."""
        return {
            "client": self.name,
            "family": self.spec.family,
            "spec": self.spec.to_json(),
            "tier": self.tier,
            "samples": len(self.train_data),
        }

    def train_round(
        self, round_id: int, glob: TensorDict, fam: TensorDict, fam_version: int, accepted: int
    ) -> tuple[TensorDict, dict[str, str], dict[str, float]]:
        """Load the server's models, train, and return (wire tensors, update header, metrics)."""
        self._settle_feedback(accepted)
        down = sum(t.numel() * t.element_size() for t in [*glob.values(), *fam.values()])
        if fam and not self._family_current(fam_version):
            self.hooks.load_family(self.handle, fam, fam_version)
            self.state["family_version_loaded"] = fam_version
        if glob:
            self.handle.load_group(GROUP_GLOBAL, glob)
        metrics = self._train_in_own_stream(round_id)
        tensors, meta = self._encode(round_id, glob, metrics)
        up = sum(t.numel() * t.element_size() for t in tensors.values())
        self.state["last_round"] = round_id
        self.state["bytes_up"] = self.state.get("bytes_up", 0) + up
        self.state["bytes_down"] = self.state.get("bytes_down", 0) + down
        self._save_state()
        self._log_round(round_id, metrics, up, down)
        return tensors, meta.to_metadata(), metrics

    def _train_in_own_stream(self, round_id: int) -> dict[str, float]:
        """Train with this client's own global RNG stream (dropout draws from it): one process
        serves many virtual clients, and an HTTP client process has the stream to itself."""
        torch.set_rng_state(self.rng)
        metrics = self._train_and_evaluate(round_id)
        self.rng = torch.get_rng_state()
        self.files.write_tensors(RNG_FILE, {"cpu": self.rng})
        return metrics

    def _family_current(self, version: int) -> bool:
        """With a family period > 1, a family model we already loaded is not loaded again (we
        keep training our own family weights between its rounds, as over HTTP)."""
        every = self.config.comm.family_every
        return every > 1 and self.state.get("family_version_loaded") == version

    def _encode(
        self, round_id: int, sent_global: TensorDict, metrics: dict[str, float]
    ) -> tuple[TensorDict, UpdateMeta]:
        """`ClientRuntime.encode_update`; its residual waits on disk for ``accepted_round``."""
        tensors, meta, pending = self.encode_update(round_id, sent_global, metrics)
        if pending.residual:
            self.files.write_tensors(PENDING_FEEDBACK, pending.state_dict())
            self.state["pending_feedback_round"] = round_id
        return tensors, meta

    def _settle_feedback(self, accepted: int) -> None:
        """Commit the pending int8 residual if the server aggregated that round, else drop it."""
        pending_round = self.state.pop("pending_feedback_round", None)
        if pending_round is None:
            return
        residual = self.files.read_tensors(PENDING_FEEDBACK)
        if pending_round == accepted and residual is not None:
            self.error_feedback = ErrorFeedback()
            self.error_feedback.load_state_dict(residual)
        else:
            log.info("%s: round %s was not aggregated; its residual is dropped", self.name,
                     pending_round)  # fmt: skip

    def final_result(self) -> dict[str, Any]:
        """What our HTTP client reports when the server finishes (`ClientRuntime._finish`)."""
        result: dict[str, Any] = {
            "rounds": self.state["last_round"],
            "bytes_up": self.state.get("bytes_up", 0),
            "bytes_down": self.state.get("bytes_down", 0),
        }
        if self.config.client.eval_test_at_end:
            test = EncodedSplit(self.backbone, self.dataset.test, self.config.train.max_length)
            result["personal_test_acc"] = evaluate(self.task, test).accuracy
        return result
