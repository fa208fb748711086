"""A Starlette site that serves the Ozwell API under /v1 to browser code on another origin (CORS), with its own pages.

Run it (from a checkout: pip install -e .; Starlette comes with it):

    export OZWELL_SECRET=$(python -c 'import secrets; print(secrets.token_hex(32))')
    export APP_ORIGINS=https://app.example.com   # origins whose pages may call /v1, comma-separated
    uvicorn examples.starlette_app:app
    ozwell-asgi keys create --name me --store sqlite:///./ozwell.db     # with the same OZWELL_SECRET
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Mount, Route

from ozwell_asgi import OzwellAPI

ozwell = OzwellAPI(
    key_store=os.environ.get("OZWELL_STORE_URL", "sqlite:///./ozwell.db"),
    secret=os.environ["OZWELL_SECRET"],
)


LIMIT_HEADERS, BUDGETS = ("limit", "remaining", "reset"), ("requests", "tokens")


async def home(request: Request) -> HTMLResponse:
    return HTMLResponse("<h1>My site</h1><p>The API is at <code>/v1</code>.</p>")


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


app = Starlette(
    routes=[Route("/", home), Route("/health", health), Mount("/v1", app=ozwell)],
    middleware=[
        # Browsers on these origins may call /v1 with a key in the Authorization header (no cookies: credentials
        # stay off), and read the rate-limit and request-id headers of the answers.
        Middleware(
            CORSMiddleware,
            allow_origins=[o.strip() for o in os.environ.get("APP_ORIGINS", "").split(",") if o.strip()],
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["*"],  # the SDKs send their own x-stainless-* headers
            expose_headers=["x-request-id", *(f"x-ratelimit-{k}-{b}" for k in LIMIT_HEADERS for b in BUDGETS)],
        )
    ],
    lifespan=ozwell.lifespan,  # Starlette does not run a mounted app's lifespan: this line does
)
