"""The HTTP API (FastAPI, versioned under ``/v1``); OpenAPI at ``/v1/openapi.json``.

Control messages are JSON, tensors are safetensors bytes (``application/octet-stream``).
Every error is JSON ``{"error": <code>, "detail": <message>, ...}`` with a 4xx status.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib import metadata
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgetune.protocol import PROTOCOL_VERSION, REGISTER_CARD
from edgetune.strategies.base import GLOBAL, family_model

from .page import PAGE
from .rounds import Coordinator
from .status import client_view
from .storage import ClientRecord
from .validation import ApiError

OCTET = "application/octet-stream"
#: Round ids and versions are SQLite integers: larger numbers are refused as 422 by name.
MAX_ROUND = 2**62
RoundId = Annotated[int, PathParam(ge=0, le=MAX_ROUND, description="round number")]
Version = Annotated[int | None, Query(ge=0, le=MAX_ROUND, description="the model as of this round")]
MAX_JSON_BYTES = 1024 * 1024  # cap for JSON control bodies (registration)
_BINARY_BODY = {
    "requestBody": {
        "required": True,
        "content": {OCTET: {"schema": {"type": "string", "format": "binary"}}},
        "description": "safetensors update with edgetune.* metadata (see edgetune.protocol.core)",
    }
}
_BINARY_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {OCTET: {"schema": {"type": "string", "format": "binary"}}},
        "description": "safetensors",
    }
}


def package_version() -> str:
    """The installed edgetune version (the server never imports the package's root)."""
    try:
        return metadata.version("edgetune")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


VERSION = package_version()


class RegisterRequest(BaseModel):
    spec: dict[str, Any] = Field(
        description="AdapterSpec as JSON (edgetune.protocol.AdapterSpec.to_dict)"
    )
    tier: str = Field(
        "default", pattern=r"^[A-Za-z0-9._-]{1,64}$", description="quantization/rank tier label"
    )
    card: dict[str, Any] | None = Field(
        None,
        alias=REGISTER_CARD,
        description="ClientCard as JSON (edgetune.protocol.ClientCard.to_dict): the head's class "
        "names; pinned per family, other names are refused (409 classes_mismatch)",
    )


class RegisterResponse(BaseModel):
    client_id: str
    token: str
    family: str
    spec: dict[str, Any]
    tier: str


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise ApiError(401, "missing_token", "Authorization: Bearer <token> header is required")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing_token", "Authorization header must be 'Bearer <token>'")
    return token.strip()


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused by name when it is declared or grows past ``limit`` bytes, or does
    not arrive within ``timeout_s`` (a client trickling bytes holds no connection for long)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(
                400, "bad_content_length", f"Content-Length {declared!r} is not a number"
            )
        if int(declared) > limit:
            raise ApiError(
                413, "payload_too_large", f"body of {declared} bytes exceeds the {limit}-byte cap"
            )
    try:
        return await asyncio.wait_for(_read_chunks(request, limit), timeout_s)
    except asyncio.TimeoutError as exc:  # TimeoutError itself from Python 3.11 on
        raise ApiError(
            408, "body_timeout", f"the body did not arrive within {timeout_s:g} s"
        ) from exc


async def _read_chunks(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"body exceeds the {limit}-byte cap")
        chunks.append(chunk)
    return b"".join(chunks)


class UploadSlots:
    """At most ``limit`` uploads read and validated at once; one more is a 429 (memory stays
    bounded by ``limit x server.max_upload_bytes`` whatever arrives)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.busy = limit, 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        if self.busy >= self.limit:  # the event loop is single-threaded: no lock needed
            raise ApiError(
                429,
                "too_many_uploads",
                f"{self.limit} uploads are in progress (server.max_concurrent_uploads); retry",
            )
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1


def _parse_register(raw: bytes) -> RegisterRequest:
    try:
        return RegisterRequest.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid body"}
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise ApiError(422, "bad_request", f"{where}: {first.get('msg', 'invalid')}") from exc


def create_app(coord: Coordinator, *, run_scheduler: bool = True) -> FastAPI:
    """The FastAPI app over a coordinator; the round scheduler runs for the app's lifetime."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if run_scheduler:
            coord.start()
        try:
            yield
        finally:
            if run_scheduler:
                coord.stop()

    app = FastAPI(
        title="EdgeTune aggregation server",
        version=VERSION,
        openapi_url="/v1/openapi.json",
        docs_url="/v1/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    _install_error_handlers(app)
    _install_routes(app, coord)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        detail = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        return JSONResponse(
            {"error": "bad_request", "detail": detail, "errors": errors}, status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": code, "detail": str(exc.detail)}, status_code=exc.status_code)


def _install_routes(app: FastAPI, coord: Coordinator) -> None:
    """Every route, in the order the OpenAPI document lists them."""
    _install_client_routes(app, coord)
    _install_model_routes(app, coord)
    _install_upload_and_status_routes(app, coord)


async def _client_of(coord: Coordinator, request: Request) -> ClientRecord:
    return await run_in_threadpool(coord.authenticate, _bearer(request))


_REGISTER_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": RegisterRequest.model_json_schema()}},
    }
}


def _install_client_routes(app: FastAPI, coord: Coordinator) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def status_page() -> HTMLResponse:
        """The status page (``server/page.py``): it asks for a token and reads /v1/status."""
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-store"})

    @app.get("/v1/health", tags=["meta"])
    async def health() -> dict[str, Any]:
        """Liveness: no auth, no state access beyond the process."""
        return {"status": "ok", "protocol": PROTOCOL_VERSION, "version": VERSION}

    @app.post(
        "/v1/register",
        status_code=201,
        response_model=RegisterResponse,
        openapi_extra=_REGISTER_BODY,
        tags=["clients"],
    )
    async def register(request: Request) -> dict[str, Any]:
        """Exchange the join token (``Authorization: Bearer <join token>``) for a client token."""
        join = _bearer(request)
        timeout_s = coord.config.body_timeout_s
        body = _parse_register(await _read_body(request, MAX_JSON_BYTES, timeout_s))
        return await run_in_threadpool(coord.register, join, body.spec, body.tier, body.card)

    @app.get("/v1/rounds/current", tags=["rounds"])
    async def current_round(request: Request) -> dict[str, Any]:
        """The current round: state, deadline, what to download and where to upload."""
        client = await _client_of(coord, request)
        return await run_in_threadpool(coord.round_info, client)


def _install_model_routes(app: FastAPI, coord: Coordinator) -> None:
    @app.get("/v1/global", response_class=Response, responses=_BINARY_RESPONSE, tags=["models"])
    async def download_global(request: Request, version: Version = None) -> Response:
        """Global branch (``global.*``) as safetensors: latest, or as of round ``version``."""
        client = await _client_of(coord, request)
        data, version = await run_in_threadpool(coord.download, GLOBAL, client, version)
        return Response(data, media_type=OCTET, headers={"X-EdgeTune-Version": str(version)})

    @app.get(
        "/v1/families/{family}",
        response_class=Response,
        responses=_BINARY_RESPONSE,
        tags=["models"],
    )
    async def download_family(family: str, request: Request, version: Version = None) -> Response:
        """Family bundle (``family.*`` / ``lora.*``): latest, or as of round ``version``."""
        client = await _client_of(coord, request)
        if family != client.family:
            raise ApiError(
                403, "forbidden", f"this client belongs to family {client.family!r}, not {family!r}"
            )
        name = family_model(family)
        data, version = await run_in_threadpool(coord.download, name, client, version)
        return Response(data, media_type=OCTET, headers={"X-EdgeTune-Version": str(version)})


def _install_upload_and_status_routes(app: FastAPI, coord: Coordinator) -> None:
    uploads = UploadSlots(coord.config.max_concurrent_uploads)

    @app.put(
        "/v1/rounds/{round_id}/updates/{client_id}", openapi_extra=_BINARY_BODY, tags=["rounds"]
    )
    async def upload(round_id: RoundId, client_id: str, request: Request) -> JSONResponse:
        """Upload this client's update for a round (201; identical retry 200; other 4xx)."""
        client = await _client_of(coord, request)
        if client.client_id != client_id:
            raise ApiError(403, "forbidden", f"token belongs to another client, not {client_id!r}")
        with uploads.slot():
            cfg = coord.config
            body = await _read_body(request, cfg.max_upload_bytes, cfg.body_timeout_s)
            status, payload = await run_in_threadpool(coord.submit_update, client, round_id, body)
        return JSONResponse(payload, status_code=status)

    @app.delete("/v1/clients/{client_id}", tags=["clients"])
    async def revoke(client_id: str, request: Request) -> dict[str, Any]:
        """Revoke a client's token for good (join token only)."""
        return await run_in_threadpool(coord.revoke, _bearer(request), client_id)

    @app.get("/v1/status", tags=["meta"])
    async def status(request: Request) -> dict[str, Any]:
        """Rounds, participants, bytes in/out, per-family metrics: all of it with the join
        token; a client token sees no other client's id."""
        reader = await run_in_threadpool(coord.status_reader, _bearer(request))
        status = await run_in_threadpool(coord.status)
        return status if reader is None else client_view(status, reader.client_id)
