"""HTTP transport of the client runtime: the server's /v1 API with retries and byte accounting.

Connection errors, timeouts and 5xx answers are retried with exponential backoff (plus jitter);
a 4xx is the server's considered answer and raises `ServerError` with its JSON error code and
detail at once. Every byte sent and received is counted (bodies as sent, headers excluded) so
the simulation can report communication exactly.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import torch

from edgetune.errors import EdgeTuneError
from edgetune.protocol import (
    REGISTER_CARD,
    AdapterSpec,
    ClientCard,
    UpdateMeta,
    decode_payload,
    encode_payload,
)

log = logging.getLogger(__name__)


class ServerError(EdgeTuneError):
    """The server refused a request (4xx) or stayed unreachable after every retry."""

    def __init__(self, status: int, code: str, detail: str, body: Mapping[str, Any] | None = None):
        super().__init__(f"server answered {status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail
        self.body = dict(body or {})


@dataclass(frozen=True)
class Registration:
    client_id: str
    token: str
    family: str


class ServerClient:
    """Talks to one aggregation server; `token` is this client's bearer token once registered."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout_s: float = 60.0,
        retries: int = 6,
        backoff_s: float = 0.5,
        verify: bool | str = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.retries = retries
        self.backoff_s = backoff_s
        self.bytes_up = 0
        self.bytes_down = 0
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s, verify=verify)

    def close(self) -> None:
        self._http.close()

    def _request(
        self, method: str, path: str, *, token: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        bearer = token or self.token
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        headers.update(kwargs.pop("extra_headers", None) or {})
        last_error = "no attempt made"
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as err:
                last_error = f"{type(err).__name__}: {err}"
            else:
                if response.status_code < 500:
                    return self._checked(response)
                last_error = f"{response.status_code}: {response.text[:200]}"
            if attempt < self.retries:
                delay = self.backoff_s * 2**attempt * (1 + random.random() / 4)
                log.warning(
                    "%s %s failed (%s); retry %d/%d in %.1fs",
                    method,
                    path,
                    last_error,
                    attempt + 1,
                    self.retries,
                    delay,
                )
                time.sleep(delay)
        raise ServerError(
            503,
            "unreachable",
            f"{self.base_url} did not answer {method} {path} after {self.retries + 1} attempts "
            f"(last: {last_error}); is the server running at that address?",
        )

    @staticmethod
    def _checked(response: httpx.Response) -> httpx.Response:
        if response.status_code < 400:
            return response
        try:
            body = response.json()
        except ValueError:
            body = {"error": "http_error", "detail": response.text[:200]}
        raise ServerError(
            response.status_code,
            str(body.get("error", "http_error")),
            str(body.get("detail", "")),
            body,
        )

    # -- the API -------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._request("GET", "/v1/health").json()

    def register(
        self, join_token: str, spec: AdapterSpec, tier: str, card: ClientCard | None = None
    ) -> Registration:
        """Exchange the join token for this client's token; ``card`` tells the server the
        class names of the head (it writes them into the family's final model)."""
        body: dict[str, Any] = {"spec": spec.to_dict(), "tier": tier}
        if card is not None:
            body[REGISTER_CARD] = card.to_dict()
        answer = self._request("POST", "/v1/register", token=join_token, json=body).json()
        self.token = answer["token"]
        return Registration(answer["client_id"], answer["token"], answer["family"])

    def current_round(self) -> dict[str, Any]:
        return self._request("GET", "/v1/rounds/current").json()

    def status(self) -> dict[str, Any]:
        return self._request("GET", "/v1/status").json()

    def download(self, path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and metadata of a model the round info names (`/v1/global`, ...)."""
        response = self._request("GET", path)
        self.bytes_down += len(response.content)
        payload = decode_payload(response.content)
        return payload.tensors, payload.metadata

    def upload(
        self, path: str, tensors: Mapping[str, torch.Tensor], meta: UpdateMeta
    ) -> dict[str, Any]:
        """PUT an update; the payload's bytes are counted once it is accepted (201 or 200)."""
        body = encode_payload(tensors, meta.to_metadata())
        response = self._request(
            "PUT", path, content=body, extra_headers={"Content-Type": "application/octet-stream"}
        )
        self.bytes_up += len(body)
        return response.json()
