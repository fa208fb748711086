"""The key management API: create, list, retrieve, revoke and rotate ``ozw_`` keys over HTTP.

    POST   /api-keys                  create  -> 201, the key object plus its "secret" (shown this once)
    GET    /api-keys                  list    -> {"object": "list", "data", "has_more", "first_id", "last_id"}
                                                 (?limit=1..100 (20) &after= &before= &order=asc|desc (asc) &owner=)
    GET    /api-keys/{key_id}         get     -> the key object
    DELETE /api-keys/{key_id}         revoke  -> {"id", "object": "api_key.deleted", "deleted": true}
    POST   /api-keys/{key_id}/rotate  rotate  -> the key object plus its new "secret"

Every route needs a key with the ``admin`` or ``admin:global`` scope (401 without a valid key, 403
``insufficient_permissions`` without the scope) and costs one request and no tokens on the caller's rate limit;
successful answers carry the rate-limit headers.

A key never reaches beyond its own grant (:func:`~ozwell_asgi.auth.exceeds`, the one rule for both): it sees and
manages only keys of its owner (of every owner with ``admin:global``) whose scopes, models, effective limits and
expiry lie within its own; any other key answers 404 ``api_key_not_found`` exactly like an unknown id and is not
listed. A key it creates gets at most what it holds (403 ``insufficient_permissions`` naming the field), where
``admin:global`` implies ``admin`` and ``admin`` implies ``api``. Fields the request leaves out default to the
creator's bounds: ``models`` to its models, ``origins`` and ``endpoints`` to its own (none for a plain key),
``expires_in`` to its expiry, and the default plan's limits are capped at its own. ``origins`` or ``endpoints``
make a scoped key (secret ``ozw_scoped_…``, scope ``api`` only; docs/keys.md). ``owner`` defaults to the
caller's; another owner needs ``admin:global`` (403).

Revoking is idempotent: revoking a revoked key answers the deletion object again (the key stays listed, with
``status: "revoked"``). Rotating a revoked key is refused with 400 ``api_key_revoked`` (it has no secret to
replace); rotating an expired key succeeds, as :meth:`KeyManager.rotate` does for the CLI, but the new secret is
no more usable than the old one until the key is replaced (its ``status`` stays ``"expired"``).

Everything goes through :class:`~ozwell_asgi.auth.KeyManager` (the CLI's implementation too) and so through the
app's :class:`~ozwell_asgi.stores.cache.CachedKeyStore`: a rotated or revoked secret stops working in this process
at once. Secrets and hashes are never in a key object; ``redacted_value`` shows the secret's first characters.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from starlette.datastructures import QueryParams
from starlette.requests import Request

from ..auth import ENDPOINTS, Grant, at_most
from ..context import Services
from ..errors import InvalidRequestError, NotFoundError, PermissionDeniedError
from ..pages import list_body
from ..responses import JSONResponse
from ..types import DEFAULT_SCOPES, SCOPE_ADMIN, SCOPE_ADMIN_GLOBAL, APIKey, PageQuery, Principal
from ..wire.keys import parse_create_key_request

__all__ = [
    "create_key",
    "delete_key",
    "key_item",
    "key_object",
    "keys_collection",
    "list_keys",
    "page_query",
    "retrieve_key",
    "rotate_key",
]

Headers = list[tuple[bytes, bytes]]

# The largest body POST /api-keys accepts: a key's fields with the most model patterns the caps allow fit many
# times over (413 past it), so a hostile body costs no more than this to parse.
MAX_KEY_REQUEST_BODY = 1024 * 1024


MAX_PAGE_LIMIT = 100
DEFAULT_PAGE_LIMIT = 20
_DIGITS = re.compile(r"[0-9]{1,10}")


def page_query(params: QueryParams, default_order: Literal["asc", "desc"]) -> PageQuery:
    """The page a list request asks for: ``limit`` (1 to 100, default 20), ``after`` or ``before`` (an id; empty:
    none), ``order`` (``asc`` or ``desc``). 400 with ``param`` naming the first bad one."""
    raw = params.get("limit")
    limit = DEFAULT_PAGE_LIMIT
    if raw is not None:
        if not _DIGITS.fullmatch(raw):
            raise InvalidRequestError(
                f"'limit' must be an integer from 1 to {MAX_PAGE_LIMIT}.", param="limit", code="invalid_type"
            )
        limit = int(raw)
        if not 1 <= limit <= MAX_PAGE_LIMIT:
            raise InvalidRequestError(
                f"'limit' must be an integer from 1 to {MAX_PAGE_LIMIT}, got {limit}.",
                param="limit",
                code="invalid_value",
            )
    raw = params.get("order", default_order)
    if raw not in ("asc", "desc"):
        raise InvalidRequestError("'order' must be 'asc' or 'desc'.", param="order", code="invalid_value")
    order: Literal["asc", "desc"] = "asc" if raw == "asc" else "desc"
    after, before = params.get("after") or None, params.get("before") or None
    if after is not None and before is not None:
        raise InvalidRequestError("Give 'after' or 'before', not both.", param="before", code="invalid_value")
    return PageQuery(limit=limit, after=after, before=before, order=order)


def key_object(key: APIKey, secret: str | None = None) -> dict[str, Any]:
    """The wire form of a key; ``secret`` is added only by create and rotate. Never the hash."""
    body: dict[str, Any] = {
        "id": key.id,
        "object": "api_key",
        "name": key.name,
        "owner": key.owner,
        "plan": key.plan,
        "rpm": key.rpm,
        "tpm": key.tpm,
        "models": None if key.models is None else list(key.models),
        "scopes": list(key.scopes),
        "origins": None if key.origins is None else list(key.origins),
        "endpoints": None if key.endpoints is None else list(key.endpoints),
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
        "status": key.status(time.time()),
        "redacted_value": key.hint + "…",
    }
    if secret is not None:
        body["secret"] = secret
    return body


def _is_global(principal: Principal) -> bool:
    return SCOPE_ADMIN_GLOBAL in principal.scopes


async def _admin(services: Services, request: Request) -> tuple[Principal, Headers]:
    """The caller, who must hold ``admin`` or ``admin:global``; one request, no tokens, taken on its limit."""
    principal = await services.authenticate(request, SCOPE_ADMIN, SCOPE_ADMIN_GLOBAL)
    return principal, await services.charge_request(principal)


def _not_found(key_id: str) -> NotFoundError:
    shown = key_id if len(key_id) <= 100 else key_id[:100] + "..."
    return NotFoundError(f"No API key found with id '{shown}'.", code="api_key_not_found")


async def _visible_key(services: Services, principal: Principal, key_id: str) -> APIKey:
    """The key ``key_id`` if the caller may manage it; 404 if unknown, another owner's (for a non-global key) or
    beyond the caller's grant: the three are indistinguishable."""
    key = await services.keys.get(key_id)
    if key is None or not services.keys.manages(principal, key):
        raise _not_found(key_id)
    return key


async def create_key(services: Services, request: Request) -> JSONResponse:
    """POST /api-keys: 201 with the key object and its ``secret``; 400 (with ``param``), 403, 413 or 415.

    What the body leaves out is bounded by the caller's grant: ``models`` are the caller's, the key expires with
    the caller, and the default plan's limits are lowered to the caller's. What it asks for explicitly beyond that
    grant is refused (403, ``param`` naming the field).
    """
    principal, headers = await _admin(services, request)
    body = parse_create_key_request(await services.read_json(request, MAX_KEY_REQUEST_BODY))
    owner = principal.owner if body.owner is None else body.owner
    if owner != principal.owner and not _is_global(principal):
        raise PermissionDeniedError(
            f"Creating a key for another owner requires the '{SCOPE_ADMIN_GLOBAL}' scope.", param="owner"
        )
    holder = Grant.of_principal(principal)
    given = body.model_fields_set
    rpm, tpm = body.rpm, body.tpm
    plan = services.plans.get(body.plan)
    if plan is not None and "plan" not in given:  # the default plan: its limits are capped at the caller's
        if rpm is None and not at_most(plan.rpm, holder.rpm):
            rpm = holder.rpm
        if tpm is None and not at_most(plan.tpm, holder.tpm):
            tpm = holder.tpm
    expires_in = body.expires_in_seconds()
    key, secret = await services.keys.create(
        name=body.name,
        owner=owner,
        plan=body.plan,
        rpm=rpm,
        tpm=tpm,
        models=body.models if "models" in given else holder.models,
        scopes=DEFAULT_SCOPES if body.scopes is None else body.scopes,
        expires_in=expires_in,
        expires_at=holder.expires_at if "expires_in" not in given else None,
        within=holder,
        origins=body.origins if "origins" in given else holder.origins,
        endpoints=body.endpoints if "endpoints" in given else _sorted(holder.endpoints),
    )
    return JSONResponse(key_object(key, secret), status=201, headers=headers)


def _sorted(endpoints: frozenset[str] | None) -> list[str] | None:
    """A restricted creator's endpoints as a key's default: those a key can hold (never ``api-keys``: a scoped key
    holds no admin scope)."""
    return None if endpoints is None else sorted(endpoints & frozenset(ENDPOINTS))


async def list_keys(services: Services, request: Request) -> JSONResponse:
    """GET /api-keys[?owner=&limit=&after=&before=&order=]: a page of the caller's owner's keys (every owner's, or
    ``owner``'s, for ``admin:global``) that lie within the caller's grant.

    Ordered by creation time, then id (``order``: ``asc`` by default, as OpenAI lists keys); revoked and expired
    keys included (see ``status``). ``has_more`` says whether more follow; the next page is ``after=last_id``. A
    cursor naming a key the caller cannot see gives an empty page, as an unknown id does. A non-global key asking
    for another owner gets 403; a bad ``limit``, ``order`` or cursor pair 400 with ``param``.
    """
    principal, headers = await _admin(services, request)
    params = request.query_params
    wanted = params.get("owner")
    if _is_global(principal):
        owner = wanted or None
    else:
        if wanted and wanted != principal.owner:
            raise PermissionDeniedError(
                f"Listing another owner's keys requires the '{SCOPE_ADMIN_GLOBAL}' scope.", param="owner"
            )
        owner = principal.owner
    query = page_query(params, "asc")
    keys = services.keys
    page = await keys.list_page(query, owner, visible=lambda key: keys.manages(principal, key))
    return JSONResponse(list_body([key_object(k) for k in page.data], page.has_more), headers=headers)


async def retrieve_key(services: Services, request: Request) -> JSONResponse:
    """GET /api-keys/{key_id}: the key object; 404 ``api_key_not_found`` if unknown or not the caller's to see."""
    principal, headers = await _admin(services, request)
    key = await _visible_key(services, principal, request.path_params["key_id"])
    return JSONResponse(key_object(key), headers=headers)


async def delete_key(services: Services, request: Request) -> JSONResponse:
    """DELETE /api-keys/{key_id}: revoke (idempotent); ``{"id", "object": "api_key.deleted", "deleted": true}``."""
    principal, headers = await _admin(services, request)
    key = await _visible_key(services, principal, request.path_params["key_id"])
    revoked = await services.keys.revoke(key.id)
    if revoked is None:  # deleted from the store between the two calls
        raise _not_found(key.id)
    return JSONResponse({"id": revoked.id, "object": "api_key.deleted", "deleted": True}, headers=headers)


async def rotate_key(services: Services, request: Request) -> JSONResponse:
    """POST /api-keys/{key_id}/rotate: the key object with its new ``secret``; the old secret stops at once.

    404 ``api_key_not_found`` as for GET; 400 ``api_key_revoked`` for a revoked key. Any request body is ignored.
    """
    principal, headers = await _admin(services, request)
    key = await _visible_key(services, principal, request.path_params["key_id"])
    rotated = None if key.revoked_at is not None else await services.keys.rotate(key.id)
    if rotated is None:
        if await services.keys.get(key.id) is None:  # deleted from the store meanwhile
            raise _not_found(key.id)
        raise InvalidRequestError(
            f"The API key '{key.id}' is revoked and cannot be rotated; create a new key instead.",
            code="api_key_revoked",
        )
    new_key, secret = rotated
    return JSONResponse(key_object(new_key, secret), headers=headers)


# One route per path, so a wrong method gets 405 with the full ``Allow`` list (HEAD is Starlette's, served as GET).


async def keys_collection(services: Services, request: Request) -> JSONResponse:
    """/api-keys: GET lists, POST creates."""
    if request.method == "POST":
        return await create_key(services, request)
    return await list_keys(services, request)


async def key_item(services: Services, request: Request) -> JSONResponse:
    """/api-keys/{key_id}: GET retrieves, DELETE revokes."""
    if request.method == "DELETE":
        return await delete_key(services, request)
    return await retrieve_key(services, request)
