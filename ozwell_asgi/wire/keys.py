"""The wire form of ``POST /v1/api-keys`` (the key management API; Ozwell's own, not one of OpenAI's).

Unlike OpenAI's request models this one is closed (``extra="forbid"``): a misspelt ``scope`` or ``model`` on a key
would otherwise be ignored silently and mint a key with more rights than meant. Only the wire shape is checked
here (types, ``rpm``/``tpm``/``expires_in`` >= 1 and bounded, the duration syntax); what
:class:`~ozwell_asgi.auth.KeyManager` validates (name and owner length, known plans and scopes) stays there, so
the CLI and the API agree.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from ..auth import parse_duration
from ._errors import ClosedModel, parse_json_body

__all__ = ["CreateAPIKeyRequest", "parse_create_key_request"]


# Bounds that keep every value inside a 64-bit column, whatever the store.
MAX_LIMIT = 10**12
MAX_EXPIRES_IN = 100 * 365 * 86400


def _duration(text: str) -> str:
    # ValueError with a client-facing message -> 400 param "expires_in"
    if parse_duration(text) > MAX_EXPIRES_IN:
        raise ValueError(f"the duration {text!r} is longer than the maximum of {MAX_EXPIRES_IN} seconds (100 years)")
    return text


class CreateAPIKeyRequest(ClosedModel):
    """``{"name", "owner"?, "plan"?, "rpm"?, "tpm"?, "models"?, "scopes"?, "expires_in"?, "origins"?,
    "endpoints"?}``.

    ``owner`` defaults to the caller's owner; ``scopes`` to ``["api"]``; ``models`` ``null`` means every model;
    ``expires_in`` is seconds (>= 1) or a duration such as ``"30d"``, ``"12h"``, ``"1w2d"``. ``origins`` (browser
    origins) or ``endpoints`` (endpoint groups) make a scoped key (``ozw_scoped_…``); ``null``: no restriction.
    """

    name: str
    owner: str | None = None
    plan: str = "free"
    rpm: Annotated[int, Field(ge=1, le=MAX_LIMIT)] | None = None
    tpm: Annotated[int, Field(ge=1, le=MAX_LIMIT)] | None = None
    models: Annotated[list[str], Field(fail_fast=True)] | None = None
    scopes: Annotated[list[str], Field(fail_fast=True)] | None = None
    expires_in: Annotated[int, Field(ge=1, le=MAX_EXPIRES_IN)] | Annotated[str, AfterValidator(_duration)] | None = None
    origins: Annotated[list[str], Field(fail_fast=True)] | None = None
    endpoints: Annotated[list[str], Field(fail_fast=True)] | None = None

    def expires_in_seconds(self) -> int | None:
        """``expires_in`` as seconds (``None``: the key never expires)."""
        if isinstance(self.expires_in, str):
            return parse_duration(self.expires_in)
        return self.expires_in


def parse_create_key_request(body: bytes) -> CreateAPIKeyRequest:
    """Validate a raw JSON body; :class:`~ozwell_asgi.errors.InvalidRequestError` (400, with ``param``) if bad."""
    return parse_json_body(CreateAPIKeyRequest, body)
