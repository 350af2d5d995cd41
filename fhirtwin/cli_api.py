"""``fhirtwin api``: the FHIR REST API alone (one per pod in a cluster), and ``build_app``,
the application that both it and `fhirtwin up` serve.

The application: ``/health`` and ``/ready`` (probes), ``/metrics`` (Prometheus),
``/auth/token``, ``/auth/jwks`` and ``/fhir/.well-known/smart-configuration``
(docs/auth.md), and the ``/fhir`` API (docs/api.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fhirtwin.cli_pipeline import KafkaOpt, RedisOpt, _endpoints

__all__ = ["api", "build_app", "register"]

err = Console(stderr=True)

HealthFn = Callable[[], dict[str, Any]]


def build_app(
    authority: Any,
    bootstrap: str,
    redis_url: str,
    *,
    live: HealthFn,
    ready: HealthFn | None = None,
) -> Any:
    """The FastAPI application. ``live()`` and ``ready()`` return ``{"status": "ok", …}``
    (anything else answers 503); ``ready`` defaults to ``live``."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response

    from fhirtwin.api import kafka_audit
    from fhirtwin.api import router as fhir_router
    from fhirtwin.auth import router as auth_router
    from fhirtwin.metrics import render
    from fhirtwin.redisconn import connect
    from fhirtwin.subscribers import Registry
    from fhirtwin.twin import TwinStore

    app = FastAPI(title="fhirtwin", docs_url="/docs")
    is_ready = ready or live

    # response_model=None: the return annotations are strings FastAPI cannot resolve here
    # (JSONResponse is imported in this function), which broke /openapi.json and /docs
    @app.get("/health", response_model=None)
    def health() -> JSONResponse:
        h = live()
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    @app.get("/ready", response_model=None)
    def ready_() -> JSONResponse:
        h = is_ready()
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    @app.get("/metrics", response_model=None)
    def metrics() -> Response:
        return Response(render(), media_type="text/plain; version=0.0.4")

    app.include_router(auth_router(authority))  # /auth/token, /fhir/.well-known/…

    client = connect(redis_url)
    from fhirtwin.api_admin import router as admin_router

    app.include_router(  # /admin, Consent writes, AuditEvent (docs/api.md): before /fhir's 405
        admin_router(
            TwinStore(client),
            Registry(client),
            authority,
            authenticate=authority.verify_bearer,
            audit=kafka_audit(bootstrap),
            bootstrap=bootstrap,
            redis_url=redis_url,
        )
    )
    from fhirtwin.api_erase import router as erase_router

    app.include_router(  # POST /fhir/Patient/{id}/$erase (docs/security.md): before the 405
        erase_router(TwinStore(client), authenticate=authority.verify_bearer, bootstrap=bootstrap)
    )
    app.include_router(  # /fhir: the FHIR REST API (docs/api.md), after /fhir/.well-known
        fhir_router(
            TwinStore(client),
            Registry(client),
            authenticate=authority.verify_bearer,
            audit=kafka_audit(bootstrap),
        )
    )
    return app


def _readiness(bootstrap: str, redis_url: str) -> HealthFn:
    """Redis answers and Kafka has the topics (Kafka checked at most every 15 s)."""
    import redis

    from fhirtwin import bus
    from fhirtwin.redisconn import connect

    client = connect(redis_url, socket_timeout=2, socket_connect_timeout=2)
    kafka_ok: list[tuple[float, bool]] = [(0.0, False)]

    def check() -> dict[str, Any]:
        parts: dict[str, str] = {}
        try:
            client.ping()
            parts["redis"] = "up"
        except redis.RedisError:
            parts["redis"] = "down"
        at, ok = kafka_ok[0]
        if time.monotonic() - at > 15 or not ok:
            try:
                ok = bool(bus.partitions_of(bootstrap, bus.AUDIT))
            except Exception:
                ok = False
            kafka_ok[0] = (time.monotonic(), ok)
        parts["kafka"] = "up" if ok else "down"
        good = all(v == "up" for v in parts.values())
        return {"status": "ok" if good else "degraded", "parts": parts}

    return check


def api(
    kafka: KafkaOpt = None,
    redis_url: RedisOpt = None,
    host: Annotated[str, typer.Option(help="listen address (0.0.0.0 in a pod)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="listen port")] = 8080,
    public_url: Annotated[
        str | None,
        typer.Option(
            help="the API's public base URL, as clients reach it (default http://HOST:PORT); "
            "the token URL clients sign for is PUBLIC_URL/auth/token "
            "(or $FHIRTWIN_PUBLIC_URL)"
        ),
    ] = None,
    key_dir: Annotated[
        Path | None,
        typer.Option(
            help="folder holding the server's token signing key (signing-key.jwk), e.g. a "
            "mounted Kubernetes Secret; default: kept in Redis, shared by every replica"
        ),
    ] = None,
) -> None:
    """The FHIR REST API alone (`/fhir`, `/auth`, `/health`, `/ready`, `/metrics`)."""
    import uvicorn

    from fhirtwin.auth import Authority
    from fhirtwin.cli_pipeline import _logging
    from fhirtwin.redisconn import connect

    _logging()
    ep = _endpoints(kafka, redis_url)
    base = (public_url or os.environ.get("FHIRTWIN_PUBLIC_URL") or f"http://{host}:{port}").rstrip(
        "/"
    )
    authority = Authority(connect(ep.redis), token_url=f"{base}/auth/token", key_dir=key_dir)
    app = build_app(
        authority,
        ep.kafka,
        ep.redis,
        live=lambda: {"status": "ok"},  # the process answers: alive (Redis down is not ours)
        ready=_readiness(ep.kafka, ep.redis),
    )
    err.print(f"fhirtwin API on http://{host}:{port} (public {base})")
    # access logs would carry patient ids and search parameters: off (no PHI in logs)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="off",
    )


def register(app: typer.Typer) -> None:
    """Add ``api`` (idempotent)."""
    if not any(c.name == "api" for c in app.registered_commands):
        app.command("api")(api)
