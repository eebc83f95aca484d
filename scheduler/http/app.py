"""The HTTP front's FastAPI app: routers, error shape, size limits, auth, schema, health and metrics.

``create_app(settings)`` builds it. Every route needs a bearer API key except
``/healthz`` (a liveness probe that says nothing about the farm) and the status
page's login form. ``/openapi.json`` is served behind the key as well, from the
app's own schema, which the schemathesis fuzz test reads.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from scheduler.core.settings import FarmSettings
from scheduler.http import batches, files, status_page, usage, videos
from scheduler.http.errors import install_error_handlers
from scheduler.http.limits import BodySizeLimit
from scheduler.http.state import Front, front_of, require_key

API_TITLE = "reelfarm"


def create_app(settings: FarmSettings, front: Front | None = None) -> FastAPI:
    app = FastAPI(
        title=API_TITLE,
        version="1",
        description="OpenAI-compatible Videos, Files and Batches APIs for a reelfarm render farm.",
        # Served below behind the API key; the interactive docs would load scripts from a CDN.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.front = front or Front.from_settings(settings)
    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimit, max_json_bytes=settings.http.max_json_bytes, max_upload_bytes=settings.http.max_upload_bytes
    )
    for router in (videos.router, files.router, batches.router, usage.router, status_page.router):
        app.include_router(router)

    @app.get("/healthz", tags=["operations"], summary="Liveness: the server answers, and whether Redis does")
    def healthz(request: Request) -> JSONResponse:
        try:
            redis_ok = bool(front_of(request).conn.ping())
        except Exception:  # noqa: BLE001 - any failure to reach Redis is "not ok", reported, not raised
            redis_ok = False
        return JSONResponse({"ok": redis_ok, "redis": redis_ok}, status_code=200 if redis_ok else 503)

    @app.get("/metrics", tags=["operations"], dependencies=[Depends(require_key)], summary="Prometheus metrics")
    def metrics(request: Request) -> Response:
        from scheduler.ops.metrics import farm_registry

        front = front_of(request)
        registry = farm_registry(front.conn, models=list(front.settings.model_dirs()))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", tags=["operations"], dependencies=[Depends(require_key)], include_in_schema=False)
    def openapi_schema() -> dict[str, Any]:
        return openapi(app)

    return app


def openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = app.openapi()
        schema.setdefault("components", {}).setdefault("schemas", {}).update(videos.COMPONENT_SCHEMAS)
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        app.openapi_schema = schema
    return app.openapi_schema
