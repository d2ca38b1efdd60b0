"""Connection-level limits uvicorn does not have: a deadline on each request's headers.

uvicorn closes idle keep-alive connections, but a client that sends its request headers a byte
at a time keeps a connection (and a slot of the server) open for as long as it likes, and any
byte it sends cancels the keep-alive timer. `with_header_deadline` gives uvicorn's own h11
protocol, unchanged otherwise, a timer armed when a connection opens and again after each
response: if no complete request head has arrived when it fires, the connection is closed.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class _HeaderDeadline(H11Protocol):
    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        waiting_for = self.cycle  # the request in progress when armed (None: none yet)
        self._header_timer = self.loop.call_later(
            self.header_timeout_s, self._headers_late, waiting_for
        )

    def _disarm_header_deadline(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _headers_late(self, waiting_for: object) -> None:
        if self.cycle is waiting_for:  # no new request head arrived in time
            self.transport.close()


def with_header_deadline(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with request heads due within ``timeout_s`` seconds."""
    return type("HeaderDeadlineProtocol", (_HeaderDeadline,), {"header_timeout_s": timeout_s})
