"""Production: keys and files in PostgreSQL, rate limits in Redis (one budget per key across every process and
host), configured by the same ``OZWELL_*`` variables as ``ozwell-asgi serve`` and served by uvicorn with serve's
connection limits, next to the product's own health routes.

Run it (from a checkout: pip install -e ".[postgres,redis]"):

    export OZWELL_SECRET=...                                  # the same on every host (or OZWELL_SECRET_FILE)
    export OZWELL_STORE_URL=postgresql://app:password@db:5432/app
    export OZWELL_LIMITER_URL=redis://cache:6379/0
    python -m examples.production          # OZWELL_HOST, OZWELL_PORT, OZWELL_WORKERS, OZWELL_LIMIT_CONCURRENCY,
                                           # OZWELL_BACKEND, ...: as for `ozwell-asgi serve` (see its --help)
    OZWELL_SECRET=... ozwell-asgi keys create --name me --store "$OZWELL_STORE_URL"

``OZWELL_STORE_URL`` and ``OZWELL_LIMITER_URL`` are required here: a production host never falls back to a local
SQLite file or to limits counted in one process's memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from ozwell_asgi import LimitsRateLimiter, OzwellAPI
from ozwell_asgi.cli.secret import resolve_secret
from ozwell_asgi.cli.serve import build_backend
from ozwell_asgi.cli.settings import ConnectionLimits, ServeConfig, ServerOptions, env, resolve

for required in ("OZWELL_STORE_URL", "OZWELL_LIMITER_URL"):
    if env(required) is None:
        raise SystemExit(f"examples/production.py: set {required} (see the module's docstring)")

config = resolve(ServeConfig)  # every OZWELL_* setting, checked as `serve` checks it
backend = build_backend(config)  # OZWELL_BACKEND: echo, openai+https://..., package.module:attribute, a router file
limiter = LimitsRateLimiter(
    config.limiter_url,
    namespace=config.limiter_namespace,
    on_storage_error="open" if config.on_limiter_error == "open" else "closed",
)
ozwell = OzwellAPI(
    backend=backend,
    key_store=config.store_url,
    file_store=config.files_url or config.store_url,  # one pool when it is the same URL; file bytes in the database
    rate_limiter=limiter,
    secret=resolve_secret(None, create=False),  # OZWELL_SECRET, else the file OZWELL_SECRET_FILE names
    key_cache_ttl=config.key_cache_ttl,
)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    try:
        async with ozwell.lifespan():  # the tokenizer before the first request; the PostgreSQL pool closed at the end
            yield
    finally:
        await limiter.aclose()  # passed in as an instance, so ours to close, as is the backend
        close: Any = getattr(backend, "aclose", None)
        if close is not None:
            await close()


async def live(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


async def ready(request: Request) -> JSONResponse:
    """Ready when the key store answers (a lookup of a key that does not exist); 503 otherwise."""
    try:
        await ozwell.keys.get("key_readiness_probe")
    except Exception as exc:
        return JSONResponse({"ok": False, "key_store": type(exc).__name__}, status_code=503)
    return JSONResponse({"ok": True})


app = Starlette(
    routes=[Route("/livez", live), Route("/readyz", ready), Mount("/v1", app=ozwell)],
    lifespan=lifespan,
)


def main() -> None:
    import uvicorn

    server = resolve(ServerOptions)
    limits = resolve(ConnectionLimits)
    if server.workers > 1 and __spec__ is None:
        raise SystemExit("examples/production.py: with OZWELL_WORKERS > 1, run it as python -m examples.production")
    # Each worker imports the app itself; a single process serves this one.
    target: Any = app if server.workers == 1 else f"{__spec__.name}:app"
    uvicorn.run(target, lifespan="on", workers=server.workers, **server.uvicorn_options(), **limits.uvicorn_options())


if __name__ == "__main__":
    main()
