"""A FastAPI app with its own routes and auth that also serves the Ozwell API under /v1.

Run it:  OZWELL_SECRET=$(python -c 'import secrets; print(secrets.token_hex(32))') uvicorn examples.fastapi_app:app
then create a key with:  ozwell-asgi keys create --name me --store sqlite:///./ozwell.db
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Header, HTTPException

from ozwell_asgi import OzwellAPI

ozwell = OzwellAPI(
    key_store=os.environ.get("OZWELL_STORE_URL", "sqlite:///./ozwell.db"),
    secret=os.environ["OZWELL_SECRET"],
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # FastAPI does not run a mounted app's lifespan: start and close the API with the host's.
    await ozwell.startup()
    yield
    await ozwell.aclose()


app = FastAPI(title="My product", lifespan=lifespan)
app.mount("/v1", ozwell)


def current_user(x_user: str | None = Header(default=None)) -> str:
    """The host's own auth, untouched by the mounted API."""
    if x_user is None:
        raise HTTPException(status_code=401, detail="log in first")
    return x_user


@app.get("/me")
async def me(user: str = Depends(current_user)) -> dict[str, str]:
    return {"user": user}
