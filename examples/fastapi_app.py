"""A FastAPI product that also serves the Ozwell API under /v1: its own routes, its own login (HTTP Basic against
its own users), its own middleware, and its own lifespan next to the API's. Its users get their ``ozw_`` keys from
it (``POST /me/keys``) and call /v1 with them; the product's login never guards /v1, and the API's keys never open
the product's routes.

Run it (from a checkout: pip install -e . fastapi):

    export OZWELL_SECRET=$(python -c 'import secrets; print(secrets.token_hex(32))')
    export APP_USERS='ann:correct-horse'        # name:password pairs, comma-separated
    uvicorn examples.fastapi_app:app
    curl -u ann:correct-horse -X POST http://127.0.0.1:8000/me/keys      # {"id": "key_...", "key": "ozw_..."}
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from ozwell_asgi import OzwellAPI
from ozwell_asgi.lifespan import combine_lifespans

ozwell = OzwellAPI(
    key_store=os.environ.get("OZWELL_STORE_URL", "sqlite:///./ozwell.db"),
    secret=os.environ["OZWELL_SECRET"],
)


def password_hash(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)


@asynccontextmanager
async def users(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    """The product's own lifespan: its users (from ``APP_USERS``), kept only as salted scrypt hashes, become the
    lifespan state that ``request.state.users`` reads."""
    table: dict[str, tuple[bytes, bytes]] = {}
    for pair in filter(None, os.environ.get("APP_USERS", "").split(",")):
        name, _, password = pair.strip().partition(":")
        salt = secrets.token_bytes(16)
        table[name] = (salt, password_hash(password, salt))
    yield {"users": table}


# The product's lifespan starts first and closes last; the API's starts the tokenizer and closes the API's pools.
app = FastAPI(title="My product", lifespan=combine_lifespans(users, ozwell.lifespan))
app.mount("/v1", ozwell)

basic = HTTPBasic(realm="my product")


def current_user(request: Request, credentials: Annotated[HTTPBasicCredentials, Depends(basic)]) -> str:
    """The product's own auth: a user of the product, never an API key."""
    known = request.state.users.get(credentials.username)
    if known is None or not hmac.compare_digest(known[1], password_hash(credentials.password, known[0])):
        raise HTTPException(status_code=401, detail="wrong name or password", headers={"WWW-Authenticate": "Basic"})
    return credentials.username


User = Annotated[str, Depends(current_user)]


@app.middleware("http")
async def served_by(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """The product's own middleware: it wraps every response, the API's (errors and streams) included."""
    began = time.perf_counter()
    response = await call_next(request)
    response.headers["x-served-by"] = "my-product"
    response.headers["server-timing"] = f"app;dur={(time.perf_counter() - began) * 1000:.1f}"
    return response


@app.get("/")
async def home() -> dict[str, str]:
    return {"product": "My product", "api": "/v1"}


@app.get("/me")
async def me(user: User) -> dict[str, str]:
    return {"user": user}


@app.post("/me/keys", status_code=201)
async def new_key(user: User, name: str = "default") -> dict[str, str]:
    """An API key owned by the logged-in user: shown once, stored only as a keyed hash."""
    key, secret = await ozwell.keys.create(name=name, owner=user)
    return {"id": key.id, "key": secret}


@app.get("/me/keys")
async def my_keys(user: User) -> list[dict[str, Any]]:
    return [{"id": key.id, "name": key.name, "hint": key.hint} for key in await ozwell.keys.list(owner=user)]
